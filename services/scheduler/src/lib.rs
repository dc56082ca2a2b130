//! The turnstile scheduler service.
//!
//! A client sends a message as a NATS request to `<prefix>.schedule.<process>`;
//! the scheduler gives it the next slot of that process and appends a signed,
//! hash-chained run of assignments to the assignment log (stream `<PREFIX>_LOG`).
//! Any number of replicas may run: the log's expected-last-subject-sequence check
//! arbitrates, so a slot is never given twice and never skipped.
//!
//! # Layout
//! - [`core`]: the pure decisions (head, dedupe window, plan, run building).
//! - [`actor`]: one task per active process: batching, writing, catching up.
//! - `audit`: the continuous audit: messages landing on served subjects, re-checks
//!   after every reconnect.
//! - [`intake`]: the services-API endpoints (schedule, slot, range, keys).
//! - [`reply`]: receipts and typed refusals.
//! - `signer`: one task sealing the runs of all processes in batches.
//! - [`writer`]: one task writing the runs of many processes: pipelined single
//!   publishes, and atomic batches for the backlog.
//! - `queue`: queue keys: the hold taken before a keyed request is assigned.
//! - [`metrics`]: counters published through the services API's STATS.
//! - [`config`]: configuration and the signing keyring.
//! - [`error`]: the crate's error type.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod actor;
mod audit;
pub mod config;
pub mod core;
pub mod error;
pub mod intake;
pub mod metrics;
mod queue;
pub mod reply;
mod signer;
pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use journal::reader::LogReader;
use journal::retry::Retry;
use journal::setup::{self, LogOptions};
use journal::subjects::Subjects;
use protocol::merkle::Tree;
use protocol::verify::{Fault, TrustedKeys};
use protocol::wire::{ErrorCode, FaultEvent, ProcessConfig, Run};
use protocol::ProcessId;

use crate::metrics::Metrics;

pub use config::{Config, Keyring};
pub use error::{Error, Result};

use crate::actor::Job;
use crate::reply::Refusal;

/// Where time comes from; the only clock the scheduler reads (the services' one
/// kind of clock).
pub use service::{skewed_clock, system_clock, Clock};

/// Limits derived from the configuration and the server's `max_payload`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_body: usize,
    /// Most bytes one request may carry into its entry: body + stored headers + id.
    pub max_request: usize,
    pub max_run_entries: usize,
    pub max_run_bytes: usize,
}

/// Most bytes of a run's `Ts-Ids` header (the NATS header block is limited to 64 KiB
/// whatever `max_payload` says); a run stops taking requests with ids before it.
pub const IDS_HEADER_BUDGET: usize = 48 * 1024;
/// Room for a run's framing, its seal and its `Ts-*` hint headers, and one entry's
/// fixed fields.
const RUN_OVERHEAD: usize = 8 * 1024;

/// State every task of one scheduler shares.
/// After the drain (`Config::drain`), how long its actors get to answer what is left `unavailable`.
const ABANDON: Duration = Duration::from_secs(5);

pub(crate) struct Shared {
    pub config: Config,
    pub limits: Limits,
    pub subjects: Subjects,
    pub log_stream: stream::Stream,
    pub reader: LogReader,
    pub keyring: Arc<Keyring>,
    pub signer: signer::Signer,
    pub writer: writer::Writer,
    pub metrics: Arc<metrics::Metrics>,
    pub processes: RwLock<HashMap<String, ProcessConfig>>,
    pub actors: Actors,
    pub clock: Clock,
    pub remote: Option<stream::Stream<()>>,
    pub tracker: TaskTracker,
    /// The keys whose seals make a run genuine: the published ones and our own.
    pub trusted: RwLock<TrustedKeys>,
    /// The core connection (fault events).
    pub core: async_nats::Client,
    /// The published-keys bucket (a key met in the log and not yet trusted is looked
    /// up there before its run is judged foreign).
    pub keys_kv: async_nats::jetstream::kv::Store,
    /// The queue-keys bucket (only requests with `Ts-Queue-Key` touch it).
    pub queue_keys: async_nats::jetstream::kv::Store,
    /// Turns for head loads and re-checks (`config.concurrent_loads` at once): after a
    /// server restart every live actor reloads, and unbounded, their reads made the
    /// server hold gigabytes (ARCHITECTURE.md "Loads take turns").
    pub loads: Arc<tokio::sync::Semaphore>,
    /// Cancelled when a drain at shutdown runs out of time: every request still held
    /// is then answered `unavailable` (its fate told, another replica takes the retry)
    /// rather than dropped with the process.
    pub abandon: tokio_util::sync::CancellationToken,
}

impl Shared {
    /// The keys trusted now.
    pub fn trusted(&self) -> TrustedKeys {
        self.trusted.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Looks `key_id` up in the published keys and trusts it if it is there and is
    /// what its id says; true when a key was newly trusted, false when none is
    /// published under that id (or what is there is not that key). Another replica may
    /// have published its key after we last read the bucket: its runs are not foreign.
    /// A read that fails is an error, not "unpublished": judged foreign on a failed
    /// read, an honest replica's run was reported as a fault.
    pub async fn learn_key(&self, key_id: &str) -> journal::Result<bool> {
        let bytes = match self.keys_kv.get(key_id).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(false),
            Err(e) => return Err(journal::Error::nats("read a published key", &e)),
        };
        let Ok(key) = protocol::wire::PublishedKey::decode(&bytes) else {
            return Ok(false);
        };
        let Ok(pk) = <[u8; 32]>::try_from(key.public_key.as_slice()) else {
            return Ok(false);
        };
        if protocol::keys::key_id(&pk) != key_id || key.key_id != key_id {
            return Ok(false);
        }
        match self.trusted.write() {
            Ok(mut t) if !t.contains(key_id) => {
                t.insert(pk);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Reports a fault found in `process`'s log: a counter, an error line and an event
    /// on `<prefix>.events.fault`.
    pub fn fault(&self, process: &ProcessId, fault: &Fault) {
        Metrics::bump(&self.metrics.faults);
        tracing::error!(process = %process, seq = fault.seq, slot = fault.slot, code = fault.kind.code(), "log fault: {}", fault.kind);
        self.event(&FaultEvent::new(
            process,
            fault,
            "scheduler",
            (self.clock)(),
        ));
    }

    /// Publishes `event` on `<prefix>.events.fault`.
    pub fn event(&self, event: &FaultEvent) {
        let Ok(bytes) = serde_json::to_vec(event) else {
            return;
        };
        let core = self.core.clone();
        let subject = self.subjects.fault_events();
        self.tracker.spawn(async move {
            if let Err(e) = core.publish(subject, bytes.into()).await {
                warn!(error = %e, "could not publish a fault event");
            }
        });
    }

    /// The process's settings (defaults when it has none).
    pub fn process_config(&self, p: &ProcessId) -> ProcessConfig {
        self.processes
            .read()
            .map(|m| m.get(p.as_str()).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Answers `jobs` once `run` is present in the remote stream, or with
    /// `remote_timeout` when it does not get there in time.
    pub fn confirm_remote(
        self: &Arc<Self>,
        written: Arc<(Run, Tree)>,
        jobs: Vec<(Job, usize, bool)>,
    ) {
        let shared = Arc::clone(self);
        self.tracker.spawn(async move {
            let Some(remote) = &shared.remote else { return };
            let (run, tree) = (&written.0, &written.1);
            let Ok(process) = ProcessId::new(run.process.clone()) else { return };
            let subject = shared.subjects.log(&process);
            let deadline = tokio::time::Instant::now() + shared.config.remote_timeout;
            loop {
                // The remote's last run, judged by its seal (not by its unsigned headers):
                // ours, or a later run of the chain sealed by a trusted key.
                let there = match remote.get_last_raw_message_by_subject(&subject).await {
                    Ok(m) => Run::decode(&m.payload).is_ok_and(|last| {
                        last == *run
                            || (last.last_slot() > run.last_slot()
                                && protocol::verify::check_run(&last, &process, &shared.trusted(), &[]).is_ok())
                    }),
                    Err(_) => false,
                };
                if there {
                    for (job, pos, dup) in &jobs {
                        job.reply.receipt(run, tree, *pos, true, *dup).await;
                    }
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    let msg = format!(
                        "durable in the local log at slots {}..={}, but not confirmed by the remote stream within {:?}",
                        run.first_slot,
                        run.last_slot(),
                        shared.config.remote_timeout
                    );
                    for (job, _, _) in &jobs {
                        job.reply.refuse(Refusal::new(ErrorCode::RemoteTimeout, msg.clone())).await;
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
}

/// A live process actor: its queue and what the audit signals it.
struct ActorHandle {
    jobs: mpsc::Sender<Job>,
    signals: Arc<actor::Signals>,
    /// Bytes of its admitted, unanswered requests.
    bytes: Arc<AtomicUsize>,
}

/// A request's share of the admission bounds (bytes queued for its process and in
/// all), given back when the request is dropped, i.e. once it is answered.
#[derive(Debug)]
pub struct Admission {
    total: Arc<AtomicUsize>,
    process: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
        self.process.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The hint a `busy` refusal gives.
pub(crate) const BUSY_RETRY_MS: u64 = 100;

/// The live process actors: one queue each.
#[derive(Default)]
pub(crate) struct Actors {
    queues: Mutex<HashMap<ProcessId, ActorHandle>>,
    /// Bytes of all admitted, unanswered requests.
    queued_bytes: Arc<AtomicUsize>,
}

impl Actors {
    /// Queues `job` for `process`, starting its actor if needed. A full queue refuses,
    /// handing the job back so that it can still be answered.
    #[allow(clippy::result_large_err)]
    pub fn submit(
        &self,
        shared: &Arc<Shared>,
        process: ProcessId,
        job: Job,
    ) -> Result<(), (Job, Refusal)> {
        let Ok(mut queues) = self.queues.lock() else {
            return Err((
                job,
                Refusal::new(ErrorCode::Internal, "actor registry poisoned"),
            ));
        };
        let mut job = job;
        for _ in 0..2 {
            let handle = queues.entry(process.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(shared.config.queue_per_process);
                let signals = Arc::new(actor::Signals::default());
                shared.tracker.spawn(actor::run(
                    Arc::clone(shared),
                    process.clone(),
                    rx,
                    Arc::clone(&signals),
                ));
                ActorHandle {
                    jobs: tx,
                    signals,
                    bytes: Arc::new(AtomicUsize::new(0)),
                }
            });
            // Admission is bounded in bytes as well as in count, per process and in
            // all: past a bound the answer is `busy`, at once, never a dropped request.
            let cost = job.body.len()
                + job
                    .headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            let total = self.queued_bytes.load(Ordering::Relaxed);
            let mine = handle.bytes.load(Ordering::Relaxed);
            let busy = |what: String| {
                Refusal::new(
                    ErrorCode::Busy,
                    format!("{what}; retry in {BUSY_RETRY_MS} ms"),
                )
            };
            if total + cost > shared.config.max_queued_bytes && total > 0 {
                let m = format!(
                    "{total} bytes of requests are queued in all (limit {})",
                    shared.config.max_queued_bytes
                );
                return Err((job, busy(m)));
            }
            if mine + cost > shared.config.max_queued_bytes_per_process && mine > 0 {
                let m = format!(
                    "{mine} bytes of requests are queued for this process (limit {})",
                    shared.config.max_queued_bytes_per_process
                );
                return Err((job, busy(m)));
            }
            self.queued_bytes.fetch_add(cost, Ordering::Relaxed);
            handle.bytes.fetch_add(cost, Ordering::Relaxed);
            job.admission = Some(Admission {
                total: Arc::clone(&self.queued_bytes),
                process: Arc::clone(&handle.bytes),
                bytes: cost,
            });
            match handle.jobs.try_send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(mut j)) => {
                    j.admission = None;
                    let m = format!(
                        "{} requests are queued for this process",
                        shared.config.queue_per_process
                    );
                    return Err((j, busy(m)));
                }
                Err(mpsc::error::TrySendError::Closed(mut j)) => {
                    // The actor idled out between our lookup and our send: start a new one.
                    j.admission = None;
                    queues.remove(&process);
                    job = j;
                }
            }
        }
        Err((
            job,
            Refusal::new(ErrorCode::Internal, "could not start the process actor"),
        ))
    }

    /// Forgets an actor whose queue is closed.
    pub fn retire(&self, process: &ProcessId) {
        if let Ok(mut queues) = self.queues.lock() {
            if queues.get(process).is_some_and(|h| h.jobs.is_closed()) {
                queues.remove(process);
            }
        }
    }

    /// Tells `process`'s actor, if it lives here, that a message landed at `seq`.
    pub fn landed(&self, process: &ProcessId, seq: u64) {
        if let Ok(queues) = self.queues.lock() {
            if let Some(h) = queues.get(process) {
                h.signals.landed(seq);
            }
        }
    }

    /// Tells every live actor to re-check its log (after a reconnect).
    pub fn recheck_all(&self) {
        if let Ok(queues) = self.queues.lock() {
            for h in queues.values() {
                h.signals.recheck();
            }
        }
    }

    /// Drops every queue: actors finish what is queued and stop.
    pub fn close_all(&self) {
        if let Ok(mut queues) = self.queues.lock() {
            queues.clear();
        }
    }
}

/// The scheduler's NATS connections, each under its own NATS identity, so that what a
/// client can make one side do never reaches the other.
#[derive(Debug, Clone)]
pub struct Connections {
    /// Writes the log, reads JetStream, publishes events: the only connection whose
    /// user may publish on `<prefix>.log.>`, the buckets and the JetStream API.
    pub core: async_nats::Client,
    /// Take client requests: a user that may subscribe to the request subjects and
    /// publish nothing but replies (`allow_responses`). Every endpoint subscribes on
    /// each (one queue group), so requests are read in parallel and a burst meets the
    /// server's per-connection `max_pending` once per connection. Their
    /// subscriptions' buffers are sized by [`INTAKE_SUBSCRIPTION_CAPACITY`]. At least one.
    pub intake: Vec<async_nats::Client>,
    /// Publishes every answer (user `scheduler-replies`: it may answer anywhere but in
    /// our own space, as it receives no request `allow_responses` could follow): answers
    /// never queue behind requests, nor requests behind answers, nor either behind log
    /// writes. None: the answers leave on the intake connection.
    pub replies: Option<async_nats::Client>,
    /// Each connection's events, counted in `$SRV.STATS` (`connections`,
    /// `slow_consumer_drops`); install them with `service::ConnectionEvents::install`.
    pub events: ConnectionsEvents,
}

/// The event counters of [`Connections`], one per connection.
#[derive(Debug, Clone, Default)]
pub struct ConnectionsEvents {
    /// Of the core connection.
    pub core: Arc<service::ConnectionEvents>,
    /// Of the intake connections.
    pub intake: Arc<service::ConnectionEvents>,
    /// Of the replies connection.
    pub replies: Arc<service::ConnectionEvents>,
}

/// Intake connections a scheduler opens unless told otherwise (`--intake-connections`).
/// The server buffers at most its `max_pending` (64 MiB) for each connection it writes
/// to faster than the reader reads; requests are spread over the connections, so a
/// burst of large requests meets that bound once per connection. With two, 300
/// requests of 900 kB sent at once cut the intake about one run in two when the
/// scheduler and the server shared one core; with four, none in 16 runs.
pub const DEFAULT_INTAKE_CONNECTIONS: usize = 4;

/// Messages each intake subscription buffers between the connection's reader and the
/// intake loop (async-nats drops past it, counted as `slow_consumer_drops`). The loop
/// answers at once (`busy` past admission), so the buffer only has to cover the
/// loop's own hiccups and a burst the server held for us while this replica was
/// stopped or starved: 256 Ki requests is about 3 s at the measured peak of a
/// replica. tokio's channel grows by blocks as it fills, so an idle buffer costs nothing.
pub const INTAKE_SUBSCRIPTION_CAPACITY: usize = 256 * 1024;

/// Runs the scheduler until `shutdown` is cancelled, with the system clock.
pub async fn run(
    config: Config,
    keyring: Keyring,
    connections: Connections,
    shutdown: CancellationToken,
) -> Result<()> {
    run_with_clock(config, keyring, connections, shutdown, system_clock()).await
}

/// Runs the scheduler with an injected clock.
pub async fn run_with_clock(
    config: Config,
    keyring: Keyring,
    connections: Connections,
    shutdown: CancellationToken,
    clock: Clock,
) -> Result<()> {
    let Connections {
        core: client,
        intake,
        replies,
        events,
    } = connections;
    if intake.is_empty() {
        return Err(Error::Config("no intake connection".into()));
    }
    let version = setup::check_server(&client)?;
    let subjects = Subjects::new(&config.prefix)?;
    let js = jetstream::new(client.clone());
    // Every startup step is retried while it fails transiently (a fresh cluster
    // elects the leader of each new stream and bucket); a permission violation the
    // core connection reports during a step ends it at once.
    let retry = Retry::new(config.startup_backoff).watching(events.core.clone());
    let options = LogOptions {
        replicas: config.replicas,
        retry: retry.clone(),
    };
    let log_stream = setup::ensure_log(&js, &subjects, &options).await?;
    let processes_kv = setup::ensure_processes(&js, &subjects, &options).await?;
    let keys_kv = setup::ensure_keys(&js, &subjects, &options).await?;
    let queue_keys = setup::ensure_queue_keys(&js, &subjects, &options).await?;
    let ours = keyring.all();
    retry
        .run("publish keys", || {
            journal::keyring::publish(&keys_kv, &ours)
        })
        .await?;
    let published = retry
        .run("read published keys", || journal::keyring::fetch(&keys_kv))
        .await?;
    let mut trusted = journal::keyring::trust(&published);
    for k in keyring.all() {
        trusted.insert(k.public_key());
    }

    let server_max = client.server_info().max_payload;
    // A run of one request must always fit the server's max_payload (headers included).
    let room = server_max.saturating_sub(IDS_HEADER_BUDGET + RUN_OVERHEAD);
    let limits = Limits {
        max_body: config.max_body.min(room),
        max_request: room,
        max_run_entries: config.max_run_entries.clamp(1, 10_000),
        max_run_bytes: config.max_run_bytes.min(room).max(1),
    };
    if limits.max_body < config.max_body {
        warn!(
            configured = config.max_body,
            server_max_payload = server_max,
            effective = limits.max_body,
            "max_body capped by the server's max_payload; raise max_payload in the server config"
        );
    }
    let remote = match &config.remote_stream {
        Some(name) => {
            let rjs = match &config.remote_domain {
                Some(d) => jetstream::with_domain(client.clone(), d),
                None => js.clone(),
            };
            Some(
                rjs.get_stream_no_info(name)
                    .await
                    .map_err(|e| Error::Config(format!("remote stream {name}: {e}")))?,
            )
        }
        None => None,
    };

    let stream_handle = js
        .get_stream_no_info(subjects.log_stream())
        .await
        .map_err(|e| journal::Error::JetStream {
            op: "open log stream",
            reason: e.to_string(),
        })?;
    let reader = LogReader::new(js.clone(), stream_handle, subjects.clone());
    let initial = retry
        .run("load process settings", || {
            intake::load_process_configs(&processes_kv)
        })
        .await?;
    let tracker = TaskTracker::new();
    let keyring = Arc::new(keyring);
    let signer = signer::Signer::start(Arc::clone(&keyring));
    let atomic = setup::allows_atomic(&log_stream);
    if !atomic {
        warn!("the log stream does not allow atomic batches; every run is written on its own");
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let writer = writer::Writer::start(
        js.clone(),
        client.clone(),
        writer::WriterLimits {
            atomic,
            singles_in_flight: config.singles_in_flight.max(1),
        },
        Arc::clone(&metrics),
    );
    let loads = Arc::new(tokio::sync::Semaphore::new(config.concurrent_loads.max(1)));
    // Clients (an alarm-loader retrying a firing) learn the idempotency window here.
    let dedupe_window_ms = config.dedupe_window.as_millis().to_string();
    let shared = Arc::new(Shared {
        config,
        limits,
        subjects: subjects.clone(),
        log_stream,
        reader,
        keyring,
        signer,
        writer,
        metrics: Arc::clone(&metrics),
        processes: RwLock::new(initial),
        actors: Actors::default(),
        clock,
        remote,
        tracker,
        trusted: RwLock::new(trusted),
        core: client.clone(),
        keys_kv: keys_kv.clone(),
        queue_keys,
        loads,
        abandon: tokio_util::sync::CancellationToken::new(),
    });

    let spec = service::Spec {
        name: "turnstile-scheduler".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: "turnstile scheduler: slots, hash-chained signed assignments".into(),
        queue_group: "turnstile-scheduler".into(),
        metadata: HashMap::from([
            ("prefix".to_string(), subjects.prefix().to_string()),
            ("max_body".to_string(), limits.max_body.to_string()),
            (
                "max_request_bytes".to_string(),
                limits.max_request.to_string(),
            ),
            (
                "max_ids_header_bytes".to_string(),
                IDS_HEADER_BUDGET.to_string(),
            ),
            (
                "max_message_id".to_string(),
                intake::MAX_MESSAGE_ID.to_string(),
            ),
            (
                "max_header_bytes".to_string(),
                intake::MAX_HEADER_BYTES.to_string(),
            ),
            (
                "max_run_entries".to_string(),
                limits.max_run_entries.to_string(),
            ),
            ("dedupe_window_ms".to_string(), dedupe_window_ms),
        ]),
    };
    let service = service::Service::start_split(
        intake.clone(),
        replies.clone(),
        spec,
        subjects.clone(),
        move |endpoint| {
            if endpoint == "schedule" {
                metrics.snapshot()
            } else {
                serde_json::Value::Null
            }
        },
    )
    .await
    .map_err(|e| Error::Service(e.to_string()))?;
    service.watch("core", client.clone(), events.core);
    // The intake connections share one event counter (their library statistics are
    // shown each on its own).
    for (i, c) in intake.iter().enumerate() {
        let name = format!("intake-{}", i + 1);
        service.watch(&name, c.clone(), Arc::clone(&events.intake));
    }
    if let Some(r) = &replies {
        service.watch("replies", r.clone(), events.replies);
    }
    let endpoint = |name: &'static str, subject: String| {
        let service = service.clone();
        async move {
            service
                .endpoint(name, subject)
                .await
                .map_err(|e| Error::Service(e.to_string()))
        }
    };
    let schedule = endpoint("schedule", subjects.schedule_all()).await?;
    let slot = endpoint("slot", subjects.slot_all()).await?;
    let range = endpoint("range", subjects.range_all()).await?;
    let keys = endpoint("keys", subjects.keys()).await?;
    for c in &intake {
        c.flush().await.map_err(|e| Error::Service(e.to_string()))?;
    }
    service
        .announce()
        .await
        .map_err(|e| Error::Service(e.to_string()))?;

    info!(server = %version, prefix = %subjects.prefix(), keys = ?shared.keyring.all().iter().map(|k| k.id()).collect::<Vec<_>>(), "scheduler ready");

    let loops = TaskTracker::new();
    loops.spawn(intake::watch_process_configs(
        Arc::clone(&shared),
        processes_kv,
        shutdown.clone(),
    ));
    loops.spawn(intake::schedule_loop(
        Arc::clone(&shared),
        schedule,
        shutdown.clone(),
    ));
    loops.spawn(intake::read_loop(
        Arc::clone(&shared),
        slot,
        shutdown.clone(),
        intake::slot,
    ));
    loops.spawn(intake::read_loop(
        Arc::clone(&shared),
        range,
        shutdown.clone(),
        intake::range,
    ));
    loops.spawn(intake::watch_keys(
        Arc::clone(&shared),
        keys_kv.clone(),
        shutdown.clone(),
    ));
    loops.spawn(intake::keys_loop(
        Arc::clone(&shared),
        keys,
        keys_kv,
        shutdown.clone(),
    ));
    loops.spawn(audit::watch_log(Arc::clone(&shared), shutdown.clone()));
    loops.spawn(audit::watch_reconnects(
        Arc::clone(&shared),
        shutdown.clone(),
    ));
    loops.close();

    shutdown.cancelled().await;
    info!("shutting down: draining queued requests");
    service.stop();
    loops.wait().await;
    shared.actors.close_all();
    shared.tracker.close();
    let drain = shared.config.drain;
    if tokio::time::timeout(drain, shared.tracker.wait())
        .await
        .is_err()
    {
        // Out of time: what is still queued or being written is answered
        // `unavailable` (an unknown fate for a write in flight), never dropped.
        warn!("process actors did not drain within {drain:?}; answering what they still hold `unavailable`");
        shared.abandon.cancel();
        if tokio::time::timeout(ABANDON, shared.tracker.wait())
            .await
            .is_err()
        {
            warn!("some process actors did not finish within {ABANDON:?} of being told to give up");
        }
    }
    // Make sure every reply has left before the connections go.
    if let Some(r) = &replies {
        let _ = r.flush().await;
    }
    for c in &intake {
        let _ = c.flush().await;
    }
    let _ = client.flush().await;
    info!("scheduler stopped");
    Ok(())
}
