//! The window loader and the dispatcher.
//!
//! Every `in_memory_interval` the loader reads the due-index buckets up to
//! now + 2 × interval (X3m's bulk loading) and arms their alarms in memory; a watch on
//! new index entries arms what is set inside an already-loaded window. When an armed
//! time comes, the alarm's record is read again (it decides, not the entry), claimed
//! by a compare-and-set, dispatched, and its outcome appended the same way. Behind the
//! window a sweep advances each partition's checkpoint over buckets left empty, so a
//! loader that starts reads from the oldest bucket that may still hold work: alarms
//! due while every loader was down fire on recovery.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use journal::client::Schedule;

use crate::alarm::{bucket_of, partition_of, Record, Target, PARTITIONS};
use crate::store::{DueEntry, Store};
use crate::timeline::{self, Entries, Next, Timeline};
use crate::{Error, Result};

/// A record whose body is larger than this is not kept from a batch read (it is read
/// alone when its time comes): memory stays bounded whatever the bodies.
const PREFETCH_MAX_BODY: usize = 16 * 1024;

/// A stored record larger than this is dropped from a batch read before it is decoded
/// (a body of [`PREFETCH_MAX_BODY`] is 4/3 of it in base64, plus the other fields).
const PREFETCH_MAX_RECORD: usize = 2 * PREFETCH_MAX_BODY + 16 * 1024;

/// The bodies of the dispatches in progress, in KiB, at most (beside their count,
/// `max_in_flight`): a dispatch holds its record, claim and outcome, each with the
/// body, so 256 dispatches of 256 KiB bodies held about a gigabyte. A dispatch waits
/// for its share after it read its record; one body larger than the whole budget
/// takes all of it.
const DISPATCH_BODY_BUDGET_KIB: u32 = 16 * 1024;

/// Records read alone (not read ahead) at once. Their size is not known before they
/// come: 256 dispatches reading records of 256 KiB bodies at once asked the server
/// for more than its per-connection pending limit, and it cut the loader's connection
/// as a slow consumer (every lease lost with it).
const LONE_READS: usize = 16;

pub use service::{skewed_clock, system_clock, Clock};

/// How the loader runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often the window is loaded; it reaches 2 × this ahead.
    pub in_memory_interval: Duration,
    /// How long past a claim's dispatch timeout before another loader takes it over.
    pub takeover_grace: Duration,
    /// Dispatches at once.
    pub max_in_flight: usize,
    /// This replica's name in the records (`by`) and in the ownership group.
    pub replica: String,
    /// The partitions' lease: a dead loader's alarms move after about this long.
    pub lease: Duration,
    /// Replicas of the ownership bucket if this loader creates it.
    pub replicas: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            in_memory_interval: Duration::from_secs(10),
            takeover_grace: Duration::from_secs(2),
            max_in_flight: 1024,
            replica: format!("loader-{}", uuid::Uuid::new_v4().simple()),
            lease: Duration::from_secs(10),
            replicas: 1,
        }
    }
}

/// What the loader counts (`$SRV.STATS`).
#[derive(Debug)]
pub struct Metrics {
    /// Dispatches started (claims won).
    pub dispatched: AtomicU64,
    /// Delivered (the target answered ok).
    pub delivered: AtomicU64,
    /// Attempts that failed (retried or dead).
    pub failed: AtomicU64,
    /// Retries the target asked for.
    pub retries_asked: AtomicU64,
    /// Dead-lettered.
    pub dead: AtomicU64,
    /// Claims or outcomes that lost a compare-and-set (another loader or a client).
    pub conflicts: AtomicU64,
    /// Window loads done.
    pub loads: AtomicU64,
    /// How long the last window load took (µs), and how many entries it read.
    pub last_load_us: AtomicU64,
    /// Entries the last window load read.
    pub last_load_entries: AtomicU64,
    /// Alarms armed in memory now.
    pub armed: AtomicU64,
    /// Partitions held now.
    pub partitions: AtomicU64,
    /// Claims taken over from a loader that died mid-dispatch.
    pub takeovers: AtomicU64,
    /// Firings looked for in the log before an attempt (a takeover, or a retry whose
    /// earlier attempt may have landed), and how many were found there.
    pub firing_lookups: AtomicU64,
    /// Of those, found in the log (recorded, not sent again).
    pub firings_found: AtomicU64,
    /// Firings answered duplicate of an entry that is not theirs (a client wrote
    /// under the firing's message id first).
    pub firing_ids_taken: AtomicU64,
    /// Lookups that could not read the log: the claim is left to its takeover.
    pub firing_lookups_failed: AtomicU64,
    /// Cron-tick alarms skipped by their job's rules.
    pub skipped: AtomicU64,
    /// Cron ticks that fell while no loader planned them and were not fired.
    pub cron_missed: AtomicU64,
    /// Firings claimed on a record read ahead in a batch (no read of their own).
    pub read_ahead: AtomicU64,
    /// Foreign messages met on alarm subjects (skipped; shared with the store).
    pub foreign_records: Arc<AtomicU64>,
    /// Due-index entries removed because they were none (shared with the store).
    pub bad_entries: Arc<AtomicU64>,
    /// Lateness (fire − due, ms) of the last firings.
    lateness: Samples,
    /// How long each step of the last dispatches took (µs): reading the record (none
    /// when it was read ahead), the claim, the firing, the outcome.
    stages: [Samples; 4],
    /// How long the loop spent in each of its last rounds of upkeep (µs): nothing due
    /// is fired meanwhile. It awaits nothing on NATS any more: the load, the
    /// catch-up retries, the sweep's checks and cron planning only start there.
    upkeep: Samples,
}

/// The steps of a dispatch whose durations are kept ([`Metrics::stages`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stage {
    Read = 0,
    Claim = 1,
    Fire = 2,
    Outcome = 3,
}

const STAGE_NAMES: [&str; 4] = ["read", "claim", "fire", "outcome"];

/// The last `cap` values of a measure, for its percentiles.
#[derive(Debug)]
struct Samples {
    cap: usize,
    values: Mutex<VecDeque<i64>>,
}

impl Samples {
    fn new(cap: usize) -> Samples {
        Samples {
            cap,
            values: Mutex::new(VecDeque::new()),
        }
    }

    fn push(&self, v: i64) {
        if let Ok(mut l) = self.values.lock() {
            if l.len() == self.cap {
                l.pop_front();
            }
            l.push_back(v);
        }
    }

    /// `{samples, p50, p99, max}` (null percentiles when empty).
    fn summary(&self) -> Value {
        let mut l: Vec<i64> = self
            .values
            .lock()
            .map(|l| l.iter().copied().collect())
            .unwrap_or_default();
        // Selection, not a sort: a STATS request costs O(samples) however often it
        // comes (a full sort of 200,000 samples was 8% of a busy loader's CPU).
        let mut pct = |p: f64| -> Option<i64> {
            if l.is_empty() {
                return None;
            }
            let i = ((l.len() as f64 - 1.0) * p).round() as usize;
            l.select_nth_unstable(i);
            l.get(i).copied()
        };
        let (p50, p99) = (pct(0.5), pct(0.99));
        let (samples, max) = (l.len(), l.iter().max().copied());
        json!({"samples": samples, "p50": p50, "p99": p99, "max": max})
    }
}

/// How long the instances of a worker group are given to answer a discovery PING.
const DISCOVERY: Duration = Duration::from_millis(300);

/// How far before a dead loader's claim its firing is looked for in the log (clock
/// skew between the loader and the scheduler).
const FIND_MARGIN_MS: u64 = 60_000;

/// How many times a dispatch's outcome is written before the claim is left to its
/// takeover.
const OUTCOME_WRITES: usize = 5;

/// How many ticks skipped for the overlap are walked back to find the running one.
const MAX_OVERLAP_WALK: usize = 1_000;

/// The shortest retry a subject target may ask for.
pub const MIN_RETRY_MS: u64 = 100;

/// The loaders' ownership group (shared/ownership).
pub const OWNERSHIP_GROUP: &str = "alarm-loader";

/// How far behind the loader's clock a partition's sweep checkpoint stays: a loader
/// whose clock runs behind (or this one's ahead) by less than this still indexes
/// after it (ARCHITECTURE.md, "The alarm-loader").
pub const SWEEP_LAG_MS: u64 = 60_000;

/// How many lateness samples the percentiles use.
const LATENESS_SAMPLES: usize = 200_000;

/// How many durations of each dispatch step the percentiles use.
const STAGE_SAMPLES: usize = 20_000;
/// Rounds of upkeep whose durations are kept.
const UPKEEP_SAMPLES: usize = 1_000;

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            dispatched: AtomicU64::default(),
            delivered: AtomicU64::default(),
            failed: AtomicU64::default(),
            retries_asked: AtomicU64::default(),
            dead: AtomicU64::default(),
            conflicts: AtomicU64::default(),
            loads: AtomicU64::default(),
            last_load_us: AtomicU64::default(),
            last_load_entries: AtomicU64::default(),
            armed: AtomicU64::default(),
            partitions: AtomicU64::default(),
            takeovers: AtomicU64::default(),
            firing_lookups: AtomicU64::default(),
            firings_found: AtomicU64::default(),
            firing_ids_taken: AtomicU64::default(),
            firing_lookups_failed: AtomicU64::default(),
            skipped: AtomicU64::default(),
            cron_missed: AtomicU64::default(),
            read_ahead: AtomicU64::default(),
            foreign_records: Arc::default(),
            bad_entries: Arc::default(),
            lateness: Samples::new(LATENESS_SAMPLES),
            stages: std::array::from_fn(|_| Samples::new(STAGE_SAMPLES)),
            upkeep: Samples::new(UPKEEP_SAMPLES),
        }
    }
}

impl Metrics {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn lateness(&self, ms: i64) {
        self.lateness.push(ms);
    }

    /// Awaits `work`, counting how long it took as a `stage` step.
    pub(crate) async fn timed<T>(
        &self,
        stage: Stage,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let t = std::time::Instant::now();
        let out = work.await;
        self.stage(stage, t.elapsed());
        out
    }

    /// How long a round of the loop's upkeep took.
    pub(crate) fn upkeep(&self, took: Duration) {
        self.upkeep
            .push(i64::try_from(took.as_micros()).unwrap_or(i64::MAX));
    }

    /// How long step `stage` of a dispatch took.
    pub(crate) fn stage(&self, stage: Stage, took: Duration) {
        self.stages[stage as usize].push(i64::try_from(took.as_micros()).unwrap_or(i64::MAX));
    }

    /// The counters, lateness p50/p99/max and the dispatch steps' durations as JSON.
    pub fn snapshot(&self) -> Value {
        let stages: serde_json::Map<String, Value> = STAGE_NAMES
            .iter()
            .zip(&self.stages)
            .map(|(name, s)| (name.to_string(), s.summary()))
            .collect();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "dispatched": get(&self.dispatched),
            "delivered": get(&self.delivered),
            "failed": get(&self.failed),
            "retries_asked": get(&self.retries_asked),
            "dead": get(&self.dead),
            "conflicts": get(&self.conflicts),
            "loads": get(&self.loads),
            "last_load_us": get(&self.last_load_us),
            "last_load_entries": get(&self.last_load_entries),
            "armed": get(&self.armed),
            "partitions": get(&self.partitions),
            "skipped": get(&self.skipped),
            "takeovers": get(&self.takeovers),
            "firing_lookups": get(&self.firing_lookups),
            "firings_found": get(&self.firings_found),
            "firing_ids_taken": get(&self.firing_ids_taken),
            "firing_lookups_failed": get(&self.firing_lookups_failed),
            "read_ahead": get(&self.read_ahead),
            "cron_missed": get(&self.cron_missed),
            "foreign_records": get(&self.foreign_records),
            "bad_entries": get(&self.bad_entries),
            "lateness_ms": self.lateness.summary(),
            "dispatch_us": stages,
            "upkeep_us": self.upkeep.summary(),
        })
    }
}

/// What a cron tick's rules say.
#[derive(Debug)]
enum CronCheck {
    /// Not fired, for this reason.
    Skip(String),
    /// Fired; with the job's current definition for a tick.
    Fire(Option<Box<crate::jobs::CronJob>>),
}

/// What a dispatch came to.
#[derive(Debug)]
enum Fired {
    Delivered {
        slot: Option<u64>,
        duplicate: bool,
    },
    RetryAsked {
        in_ms: u64,
        body: Option<Vec<u8>>,
    },
    /// Failed, perhaps after the firing was written (a timeout, `unavailable`).
    Failed(String),
    /// Failed, and nothing was written: the scheduler refused it for a reason that
    /// means so (busy, disabled, too large, ...), or no scheduler received it.
    Refused(String),
}

/// Whether a failed schedule request certainly wrote nothing: no scheduler received
/// it, or the scheduler refused it with a code that means nothing was written. A
/// timeout, `unavailable`, `remote_timeout` (written locally) or `internal` may have.
fn wrote_nothing(e: &journal::Error) -> bool {
    use protocol::wire::ErrorCode as C;
    match e {
        journal::Error::NoResponders(_) => true,
        journal::Error::Refused { code, .. } => matches!(
            code,
            C::InvalidProcess
                | C::Malformed
                | C::MalformedRequest
                | C::TooLarge
                | C::UnknownMode
                | C::Disabled
                | C::RemoteNotConfigured
                | C::MissingKey
                | C::LogFull
                | C::Busy
                | C::QueueKeyHeld
        ),
        _ => false,
    }
}

/// Firing ids none of whose attempts so far can be in the log (each was refused with
/// nothing written): their retry need not look there first. Memory only: after a
/// restart every retry looks (the safe side). Bounded: when full it is emptied.
#[derive(Default)]
struct Unwritten(std::sync::Mutex<HashSet<String>>);

const UNWRITTEN_MAX: usize = 100_000;

impl Unwritten {
    fn take(&self, firing: &str) -> bool {
        self.0.lock().map(|mut s| s.remove(firing)).unwrap_or(false)
    }

    fn insert(&self, firing: String) {
        if let Ok(mut s) = self.0.lock() {
            if s.len() >= UNWRITTEN_MAX {
                s.clear();
            }
            s.insert(firing);
        }
    }
}

/// A subject target's answer (schemas/alarms.md, "Subject targets").
#[derive(Debug, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum Answer {
    Ok,
    Retry {
        in_ms: u64,
        #[serde(default)]
        body_base64: Option<String>,
    },
    Error {
        #[serde(default)]
        reason: String,
    },
}

/// The loader: owns the dispatch of the partitions it holds.
#[derive(Clone)]
pub struct Loader {
    store: Store,
    scheduler: journal::client::Client,
    dispatch: async_nats::Client,
    config: Config,
    clock: Clock,
    metrics: Arc<Metrics>,
    unwritten: Arc<Unwritten>,
    /// [`DISPATCH_BODY_BUDGET_KIB`].
    bodies: Arc<Semaphore>,
    /// [`LONE_READS`].
    lone_reads: Arc<Semaphore>,
}

impl Loader {
    /// A loader writing through `store`, scheduling into processes with `scheduler`
    /// and sending subject targets' requests on `dispatch`.
    pub fn new(
        store: Store,
        scheduler: journal::client::Client,
        dispatch: async_nats::Client,
        config: Config,
        clock: Clock,
    ) -> Loader {
        let (foreign_records, bad_entries) = store.counters();
        Loader {
            store,
            scheduler,
            dispatch,
            config,
            clock,
            metrics: Arc::new(Metrics {
                foreign_records,
                bad_entries,
                ..Metrics::default()
            }),
            unwritten: Arc::default(),
            bodies: Arc::new(Semaphore::new(DISPATCH_BODY_BUDGET_KIB as usize)),
            lone_reads: Arc::new(Semaphore::new(LONE_READS)),
        }
    }

    /// Its counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Runs until `shutdown`: joins the loaders' ownership group and loads, sweeps and
    /// fires the partitions it holds. Dispatches in flight are finished (their
    /// outcomes recorded) and the partitions released before it returns.
    pub async fn run(self, js: jetstream::Context, shutdown: CancellationToken) -> Result<()> {
        let mut ownership_config = ownership::Config::new(
            OWNERSHIP_GROUP,
            PARTITIONS,
            self.config.lease,
            &self.config.replica,
        )
        .map_err(|e| Error::Invalid(e.to_string()))?;
        ownership_config.subjects = self.store.subjects().clone();
        ownership_config.replicas = self.config.replicas;
        let mut membership = ownership::Membership::join(js.clone(), ownership_config)
            .await
            .map_err(|e| Error::js("join the loaders' group", e))?;
        let mut lease_rx = membership
            .leases()
            .ok_or_else(|| Error::Invalid("ownership leases taken twice".into()))?;
        let mut leases: Holdings<ownership::Lease> = Holdings::default();
        let mut lost = futures::stream::FuturesUnordered::new();
        // The armed alarms, the loaded window and when the next load is due.
        let mut timeline = Timeline::new(
            self.config.in_memory_interval,
            (self.clock)(),
            tokio::time::Instant::now(),
        );
        let mut swept: HashMap<u32, u64> = HashMap::new();
        // Partitions taken whose past (checkpoint to window) is not loaded yet, each
        // with the number of its latest ask; the catch-up under way (beside the loop,
        // one round at a time), the last ask it or an earlier round took, its results.
        let mut catch_up: BTreeMap<u32, u64> = BTreeMap::new();
        let mut asks: u64 = 0;
        let mut catching = false;
        let mut tried: u64 = 0;
        // The interval's upkeep came: partitions still pending are tried again.
        let mut retry_catch_up = false;
        let (caught_tx, mut caught_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Caught>>();
        let mut watch = self.watch_new_entries(&js).await?;
        let permits = Arc::new(Semaphore::new(self.config.max_in_flight.max(1)));
        // A permit taken and not used yet.
        let mut spare: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let tracker = tokio_util::task::TaskTracker::new();
        // The loop's upkeep runs beside it; a panic there would leave its flag set and
        // the loader alive but deaf (no load, no sweep, ever): it ends the loop.
        let (panicked_tx, mut panicked_rx) = tokio::sync::mpsc::unbounded_channel();
        let beside = Beside {
            tracker: tracker.clone(),
            panicked: panicked_tx,
        };
        let mut failed: Option<&'static str> = None;
        let (rearm_tx, mut rearm_rx) = tokio::sync::mpsc::unbounded_channel::<(Next, DueEntry)>();
        // Records of alarms due soon, read in batches ahead of their time (a hint: only
        // a compare-and-set acts on one), and whether a batch read is under way.
        let mut open = Open::default();
        let mut prefetched: HashMap<String, (Record, u64)> = HashMap::new();
        let mut prefetching = false;
        let (prefetch_tx, mut prefetch_rx) =
            tokio::sync::mpsc::unbounded_channel::<HashMap<String, (Record, u64)>>();
        // The window load under way (through which bucket), its result, and the
        // entries watched meanwhile for the buckets it reads (armed when it ends).
        let mut loading: Option<u64> = None;
        let (load_tx, mut load_rx) = tokio::sync::mpsc::unbounded_channel::<Loaded>();
        let mut held_back: Vec<DueEntry> = Vec::new();
        // Whether checkpoints are being advanced, and what moved.
        let mut sweeping = false;
        let (swept_tx, mut swept_rx) =
            tokio::sync::mpsc::unbounded_channel::<Vec<(u32, u64, u64)>>();
        // Whether a round of cron planning is under way.
        let planning = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Removals of settled due entries, run beside the loop: what each left.
        let (removed_tx, mut removed_rx) =
            tokio::sync::mpsc::unbounded_channel::<(u32, u64, Removal)>();
        info!(replica = %self.config.replica, "alarm loader running");
        loop {
            let now = (self.clock)();
            // Load the window of the partitions held when its time comes.
            if timeline.load_due(tokio::time::Instant::now()) {
                let upkeep = std::time::Instant::now();
                let owned: Vec<u32> = leases.partitions();
                // The window is read beside the loop, which goes on firing what is
                // due meanwhile (a load of a busy bucket takes long: read inline, it
                // once held every firing back for as long).
                if loading.is_none() {
                    if let Some(window) = timeline.window(now) {
                        let until = *window.end();
                        loading = Some(until);
                        let (store, tx) = (self.store.clone(), load_tx.clone());
                        let owned = owned.clone();
                        beside.spawn("window load", async move {
                            let started = std::time::Instant::now();
                            let read = store.load_checked(&owned, window).await;
                            let _ = tx.send(Loaded {
                                until,
                                owned,
                                started,
                                read,
                            });
                        });
                    }
                }
                // Partitions whose catch-up failed are tried again, once an interval.
                retry_catch_up = true;
                let mut removals = Vec::new();
                let plans = Self::plan_sweep(&owned, &swept, &mut open, now, &mut removals);
                // The checks that buckets are empty (JetStream API requests, queued
                // behind everyone else's) run beside the loop, one round at a time.
                if !plans.is_empty() && !sweeping {
                    sweeping = true;
                    let (me, tx) = (self.clone(), swept_tx.clone());
                    beside.spawn("sweep", async move {
                        let _ = tx.send(me.advance_checkpoints(plans).await);
                    });
                }
                for (p, b, entries) in removals {
                    let (store, tx) = (self.store.clone(), removed_tx.clone());
                    beside.spawn("entry removal", async move {
                        let failed = store.remove_settled(p, b, entries).await;
                        let _ = tx.send((p, b, failed));
                    });
                }
                // Cron planning reads every job of the partitions held (a consumer
                // made and deleted): beside the loop too, one round at a time. The
                // ticks it makes come back through the watch, as any set does.
                if !planning.swap(true, Ordering::AcqRel) {
                    let (me, planning) = (self.clone(), Arc::clone(&planning));
                    let horizon = timeline.horizon(now);
                    beside.spawn("cron planning", async move {
                        me.plan_jobs(&owned, now, horizon).await;
                        planning.store(false, Ordering::Release);
                    });
                }
                timeline.load_done(tokio::time::Instant::now());
                self.metrics.upkeep(upkeep.elapsed());
            }
            // Catch up partitions taken since the last round started (at once; what
            // failed is tried again at the next interval, or with a newer ask's round).
            if !catching {
                let retry = std::mem::take(&mut retry_catch_up) && !catch_up.is_empty();
                if retry || catch_up.values().any(|&ask| ask > tried) {
                    catching = true;
                    tried = asks;
                    self.start_catch_up(&catch_up, &leases, now, &timeline, &beside, &caught_tx);
                }
            }
            self.metrics
                .armed
                .store(timeline.len() as u64, Ordering::Relaxed);
            self.metrics
                .partitions
                .store(leases.len() as u64, Ordering::Relaxed);
            // Read ahead the records of what is due soon, in one batch.
            if !prefetching {
                if let Some(wanted) = timeline.read_ahead(now, |id| prefetched.contains_key(id)) {
                    prefetching = true;
                    let store = self.store.clone();
                    let tx = prefetch_tx.clone();
                    beside.spawn("read-ahead", async move {
                        let got = match store.read_many(&wanted, PREFETCH_MAX_RECORD).await {
                            Ok(got) => got,
                            Err(e) => {
                                debug!(error = %e, "batch read of due records failed; read alone");
                                HashMap::new()
                            }
                        };
                        let _ = tx.send(got);
                    });
                }
            }
            // Fire what is due, as far as the permits go. The loop never waits for a
            // permit here: it must go on taking read-aheads, outcomes and leases
            // meanwhile (it once waited, and every record read ahead sat unread in its
            // channel while the backlog was fired one read at a time).
            // Whether what is due waits for permits.
            let mut starved = false;
            loop {
                let permit = match spare.take() {
                    Some(p) => p,
                    None => match Arc::clone(&permits).try_acquire_owned() {
                        Ok(p) => p,
                        Err(_) => {
                            starved = timeline.has_due(now);
                            break;
                        }
                    },
                };
                let Some(entry) = timeline.pop_due(now) else {
                    spare = Some(permit);
                    break;
                };
                // Only for a partition held: one given up is forgotten with its alarms
                // when its lease ends. Whether the lease is current this instant is not
                // asked: the claim's compare-and-set is the safety, and a lease whose
                // renewal is late must not hold its alarms back.
                if !leases.contains_key(&partition_of(&entry.id)) {
                    spare = Some(permit);
                    continue;
                }
                let hint = prefetched.remove(&entry.id);
                let me = self.clone();
                let rearm = rearm_tx.clone();
                tracker.spawn(async move {
                    let dispatch = std::panic::AssertUnwindSafe(me.dispatch(&entry, hint));
                    let next = match dispatch.catch_unwind().await {
                        Ok(Ok(next)) => next,
                        Ok(Err(e)) => {
                            // Its entry is still there; keep it in memory too.
                            warn!(alarm = %entry.id, error = %e, "dispatch failed; trying again shortly");
                            Next::again((me.clock)())
                        }
                        // A defect, not the loader's end: that alarm is looked at again
                        // (its claim, if one was written, is taken over in time).
                        Err(_) => {
                            error!(alarm = %entry.id, "dispatch panicked; trying again shortly");
                            Next::again((me.clock)())
                        }
                    };
                    // The permit goes back before the loop hears of the outcome.
                    drop(permit);
                    let _ = rearm.send((next, entry));
                });
            }
            // Starved of permits, what is due waits for one (not for its time, which
            // has come).
            let wake = if starved {
                timeline.until_load(tokio::time::Instant::now())
            } else {
                timeline.wake(now, tokio::time::Instant::now())
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(what) = panicked_rx.recv() => {
                    error!(task = what, "a task of the loop's upkeep panicked; the loader stops (restart it: every alarm is in JetStream)");
                    failed = Some(what);
                    break;
                }
                _ = tokio::time::sleep(wake) => {}
                Ok(p) = Arc::clone(&permits).acquire_owned(), if starved => spare = Some(p),
                Some(lease) = lease_rx.recv() => {
                    let (p, token) = (lease.partition(), lease.token().get());
                    lost.push(lease.cancellation().cancelled_owned().map(move |()| (p, token)));
                    leases.insert(p, token, lease);
                    // Catch the partition up: from its checkpoint to the window, beside
                    // the loop (again at each interval until it worked).
                    asks += 1;
                    catch_up.insert(p, asks);
                    debug!(partition = p, "partition taken");
                }
                Some((p, token)) = lost.next() => {
                    // Given up (rebalanced, or not renewed in time): forget its alarms.
                    // Unless the partition was taken again since (this loop was busy
                    // while the membership gave the lease up, released and acquired
                    // it anew, and the new lease came first): that loss is stale.
                    if !leases.lose(p, token) {
                        debug!(partition = p, token, "loss of an earlier lease of a partition held again; ignored");
                        continue;
                    }
                    swept.remove(&p);
                    open.forget(p);
                    catch_up.remove(&p);
                    timeline.forget(p);
                    prefetched.retain(|id, _| partition_of(id) != p);
                    debug!(partition = p, "partition given up");
                }
                Some(got) = prefetch_rx.recv() => {
                    prefetching = false;
                    for (id, (record, seq)) in got {
                        if record.alarm.body.len() <= PREFETCH_MAX_BODY && timeline.is_armed(&id) {
                            prefetched.insert(id, (record, seq));
                        }
                    }
                }
                Some(loaded) = load_rx.recv() => {
                    loading = None;
                    let held: Vec<DueEntry> = std::mem::take(&mut held_back);
                    match loaded.read {
                        Ok((entries, bad)) => {
                            self.remove_bad_entries(&bad).await;
                            self.metrics
                                .last_load_entries
                                .store(entries.len() as u64, Ordering::Relaxed);
                            // A partition given up meanwhile is not armed; one taken
                            // meanwhile was caught up only through the buckets loaded
                            // before: it is caught up again, through these.
                            for e in entries.into_iter().chain(held) {
                                if leases.contains_key(&partition_of(&e.id)) {
                                    prefetched.remove(&e.id);
                                    if timeline.arm(e.clone()) {
                                        open.note(&e);
                                    }
                                }
                            }
                            timeline.loaded(loaded.until);
                            Metrics::bump(&self.metrics.loads);
                            let us = u64::try_from(loaded.started.elapsed().as_micros())
                                .unwrap_or(u64::MAX);
                            self.metrics.last_load_us.store(us, Ordering::Relaxed);
                            let taken: Vec<u32> = leases
                                .partitions()
                                .into_iter()
                                .filter(|p| !loaded.owned.contains(p))
                                .collect();
                            for p in taken {
                                asks += 1;
                                catch_up.insert(p, asks);
                            }
                        }
                        Err(e) => {
                            // Those buckets are read again by the next load, with what
                            // was held back.
                            warn!(error = %e, "loading the alarm window failed; retrying at the next interval")
                        }
                    }
                }
                Some(caught) = caught_rx.recv() => {
                    catching = false;
                    for c in caught {
                        // Not for a partition given up, or taken again, meanwhile: its
                        // new lease asked anew.
                        if leases.token(c.p) != Some(c.token) {
                            continue;
                        }
                        let Some((from, entries)) = c.read else {
                            continue;
                        };
                        for e in entries {
                            if timeline.arm(e.clone()) {
                                open.note(&e);
                            }
                        }
                        swept.insert(c.p, from);
                        // Asked again meanwhile (a load it was not part of ended): the
                        // next round reads its past again, through the window loaded now.
                        if catch_up.get(&c.p) == Some(&c.ask) {
                            catch_up.remove(&c.p);
                        }
                    }
                }
                Some(moved) = swept_rx.recv() => {
                    sweeping = false;
                    // Not for a partition given up, or caught up anew, meanwhile.
                    for (p, from, to) in moved {
                        if swept.get(&p) == Some(&from) && leases.contains_key(&p) {
                            swept.insert(p, to);
                        }
                    }
                }
                Some((p, b, failed)) = removed_rx.recv() => {
                    if !failed.is_empty() {
                        debug!(partition = p, bucket = b, left = failed.len(), "removing settled due entries failed; again at the next sweep");
                    }
                    open.removed(p, b, failed);
                }
                Some((next, entry)) = rearm_rx.recv() => {
                    // A dispatch of a partition given up meanwhile is not looked at again.
                    if leases.contains_key(&partition_of(&entry.id)) {
                        open.settle(&entry.id, next.entries);
                        timeline.rearm(&next, entry);
                    }
                }
                m = watch.next() => match m {
                    Some(Ok(m)) => match self.store.due_entry(m.subject.as_str(), &m.payload) {
                        Ok(mut e) => {
                            e.seq = m.info().map_or(0, |i| i.stream_sequence);
                            if timeline.in_window(e.at_ms)
                                && leases.contains_key(&partition_of(&e.id))
                            {
                                // Set again: what was read ahead is older than that.
                                prefetched.remove(&e.id);
                                if timeline.arm(e.clone()) {
                                    open.note(&e);
                                }
                            } else if loading.is_some_and(|until| bucket_of(e.at_ms) <= until) {
                                // In the buckets a load under way reads: it may have
                                // read them before this entry was stored.
                                held_back.push(e);
                            }
                        }
                        Err(why) => {
                            // Not an entry: its partition's holder removes it.
                            let held = self
                                .store
                                .subjects()
                                .due_partition(m.subject.as_str())
                                .is_some_and(|p| leases.contains_key(&p));
                            if held {
                                warn!(subject = %m.subject, %why, "not a due entry");
                                match m.info() {
                                    Ok(i) => {
                                        let bad = [(m.subject.to_string(), i.stream_sequence)];
                                        self.remove_bad_entries(&bad).await;
                                    }
                                    // Its bucket's load meets it again, with its sequence.
                                    Err(e) => debug!(error = %e, "a watched message without its sequence"),
                                }
                            }
                        }
                    },
                    Some(Err(e)) => warn!(error = %e, "due-index watch"),
                    None => {
                        warn!("due-index watch ended; restarting it");
                        watch = self.watch_new_entries(&js).await?;
                    }
                },
            }
        }
        tracker.close();
        tracker.wait().await;
        drop(leases);
        drop(lost);
        if let Err(e) = membership.leave().await {
            warn!(error = %e, "leaving the loaders' group; others take over when the leases expire");
        }
        match failed {
            Some(task) => Err(Error::Panicked(task)),
            None => Ok(()),
        }
    }

    /// Starts a round of catch-up beside the loop for every partition in `pending`
    /// (held, with the lease it is held under), through the window loaded now; its
    /// results come back on `tx`. Read inline, a takeover's catch-up (a partition's
    /// past: every bucket from its checkpoint) held every firing of the loader back.
    fn start_catch_up(
        &self,
        pending: &BTreeMap<u32, u64>,
        leases: &Holdings<ownership::Lease>,
        now: u64,
        timeline: &Timeline,
        beside: &Beside,
        tx: &tokio::sync::mpsc::UnboundedSender<Vec<Caught>>,
    ) {
        let through = timeline.loaded_through();
        let todo: Vec<(u32, u64, u64)> = pending
            .iter()
            .filter_map(|(&p, &ask)| leases.token(p).map(|token| (p, token, ask)))
            .collect();
        let (me, tx) = (self.clone(), tx.clone());
        beside.spawn("catch-up", async move {
            let mut caught = Vec::with_capacity(todo.len());
            for (p, token, ask) in todo {
                let read = me.read_past(p, now, through).await;
                caught.push(Caught {
                    p,
                    token,
                    ask,
                    read,
                });
            }
            let _ = tx.send(caught);
        });
    }

    /// Reads the past of partition `p` (from its sweep checkpoint, or the stream's
    /// first message, through bucket `through`): the checkpoint and the entries; none
    /// if the checkpoint or the entries could not be read (the partition stays
    /// pending; unswept unless an earlier round caught it up).
    async fn read_past(&self, p: u32, now: u64, through: u64) -> Option<(u64, Vec<DueEntry>)> {
        let from = match self.store.swept(p).await {
            // A sweep writes only buckets before the one before the present; a
            // checkpoint that says otherwise is not one (forged, or a clock that
            // ran far ahead) and would hide every alarm behind it.
            Ok(Some(b)) if b.saturating_add(2) <= bucket_of(now) => Some(b),
            Ok(Some(b)) => {
                warn!(
                    partition = p,
                    checkpoint = b,
                    "a sweep checkpoint ahead of the present: ignored"
                );
                self.first_bucket(now).await
            }
            // Never swept: from the stream's first message as it is now (not as it
            // was when this loader started: an empty stream then would make this
            // the present, and skip the buckets a dead holder left behind).
            Ok(None) => self.first_bucket(now).await,
            Err(e) => {
                warn!(partition = p, error = %e, "reading a sweep checkpoint failed; again at the next interval");
                None
            }
        }?;
        match self.store.load_checked(&[p], from + 1..=through).await {
            Ok((entries, bad)) => {
                self.remove_bad_entries(&bad).await;
                debug!(
                    partition = p,
                    from,
                    through,
                    entries = entries.len(),
                    "partition caught up"
                );
                Some((from, entries))
            }
            Err(e) => {
                warn!(partition = p, error = %e, "catching a partition up failed; again at the next interval");
                None
            }
        }
    }

    /// Removes the messages of the due index that are no entry (each on its subject,
    /// through its sequence: a genuine entry stored after it stays); left there, one
    /// would hold its bucket unswept for ever. A failure is retried at the next load
    /// that meets it.
    async fn remove_bad_entries(&self, bad: &[(String, u64)]) {
        for (s, seq) in bad {
            if let Err(e) = self.store.remove_bad_entry(s, *seq).await {
                warn!(subject = %s, error = %e, "removing a stray due entry failed");
            }
        }
    }

    /// The bucket before the stream's first message as it is now (none if it cannot
    /// be read: the catch-up is tried again at the next interval).
    async fn first_bucket(&self, now: u64) -> Option<u64> {
        match self.store.first_timestamp_ms().await {
            Ok(first) => Some(bucket_of(first.unwrap_or(now)).saturating_sub(1)),
            Err(e) => {
                warn!(error = %e, "reading the stream's start failed; again at the next interval");
                None
            }
        }
    }

    /// Hands out the removal of the settled entries of each partition's past buckets
    /// whose entries this loader saw are all settled ([`Open`]; the caller runs them),
    /// and plans how far each partition's checkpoint may move: over the past buckets
    /// whose seen entries are all settled (at most a bounded number a round),
    /// [`SWEEP_LAG_MS`] behind this loader's clock. [`Loader::advance_checkpoints`]
    /// then checks that they are empty, beside the loop.
    fn plan_sweep(
        partitions: &[u32],
        swept: &HashMap<u32, u64>,
        open: &mut Open,
        now: u64,
        removals: &mut Vec<(u32, u64, Removal)>,
    ) -> Vec<SweepPlan> {
        const CHECKS_PER_ROUND: u64 = 360;
        let now_bucket = bucket_of(now);
        // Another loader's clock may run behind this one (or this one ahead): a set it
        // answers, or a retry it re-arms, indexes at what is the present for it. The
        // checkpoint must not pass that, or a holder that catches the partition up
        // from it would never see the entry; so it stays a minute behind.
        let sweep_bucket = bucket_of(now.saturating_sub(SWEEP_LAG_MS));
        let mut plans = Vec::new();
        for &p in partitions {
            let Some(&done) = swept.get(&p) else { continue };
            // Its entries that this loader saw are all settled: remove them at once,
            // whatever the clocks (only what was seen, and settled, goes). The bucket
            // before the current one may still receive a re-arm; stop there.
            for b in open.past_buckets(p, done, now_bucket) {
                if let Some(r) = open.take_removal(p, b) {
                    removals.push((p, b, r));
                }
            }
            let mut limit = done.saturating_add(1);
            while limit.saturating_add(1) < sweep_bucket
                && limit - done <= CHECKS_PER_ROUND
                && open.quiet(p, limit)
            {
                limit += 1;
            }
            if limit > done.saturating_add(1) {
                plans.push(SweepPlan { p, done, limit });
            }
        }
        plans
    }

    /// Moves each planned partition's checkpoint over the buckets after it that are
    /// empty, up to its limit; what moved: (partition, from, to).
    async fn advance_checkpoints(&self, plans: Vec<SweepPlan>) -> Vec<(u32, u64, u64)> {
        let mut moved = Vec::new();
        for SweepPlan { p, done, limit } in plans {
            let mut b = done + 1;
            while b < limit {
                match self.store.bucket_is_empty(p, b).await {
                    Ok(true) => b += 1,
                    Ok(false) => break,
                    Err(e) => {
                        debug!(partition = p, error = %e, "sweep check failed");
                        break;
                    }
                }
            }
            if b > done + 1 {
                match self.store.set_swept(p, b - 1).await {
                    Ok(()) => moved.push((p, done, b - 1)),
                    Err(e) => debug!(partition = p, error = %e, "sweep checkpoint not written"),
                }
            }
        }
        moved
    }

    /// Looks for `firing` (a message id) in `process`'s log among the entries the
    /// scheduler wrote between `from_ms` and `to_ms`, each widened by
    /// [`FIND_MARGIN_MS`] (clock skew, and a write that landed after its request timed
    /// out: at most the scheduler's write deadline later): its slot, or none. Both ends
    /// are found by bisection on the entries' timestamps, so only the span of the
    /// attempts is paged. A read that fails is an error, never "not found": a firing
    /// whose earlier attempt may have landed is not sent blind.
    async fn find_firing(
        &self,
        process: &str,
        record: &Record,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Option<u64>> {
        let firing = record.firing_id(self.store.firing_key());
        let untagged = record.untagged_firing_id();
        let Ok(process) = protocol::ProcessId::new(process) else {
            return Ok(None);
        };
        let Some(head) = self.scheduler.slot(&process).await?.slot else {
            return Ok(None);
        };
        let lo = self
            .first_written_at(&process, head, from_ms.saturating_sub(FIND_MARGIN_MS))
            .await?;
        let hi = self
            .first_written_at(&process, head, to_ms.saturating_add(FIND_MARGIN_MS))
            .await?;
        let mut from = Some(lo);
        while let Some(f) = from.filter(|f| *f < hi) {
            let page = self
                .scheduler
                .range(
                    &process,
                    &protocol::wire::RangeRequest {
                        from: f,
                        to: Some(hi - 1),
                        limit: None,
                    },
                )
                .await?;
            // The id and the content: an entry a client wrote under the firing's id
            // is not the firing ([`Record::is_fired_as`]). The id of a loader from
            // before ids were tagged counts too: a firing it sent may be under way.
            if let Some(e) = page.entries.iter().find(|e| {
                (e.message_id == firing || e.message_id == untagged)
                    && record.is_fired_as(&protocol::Hash32::digest(&e.body), &e.headers)
            }) {
                return Ok(Some(e.slot));
            }
            from = page.next;
        }
        Ok(None)
    }

    /// The first slot of `process` (through `head`) written at or after `ms` (the
    /// scheduler's timestamp), `head + 1` when none.
    async fn first_written_at(
        &self,
        process: &protocol::ProcessId,
        head: u64,
        ms: u64,
    ) -> Result<u64> {
        let (mut lo, mut hi) = (0u64, head + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let page = self
                .scheduler
                .range(
                    process,
                    &protocol::wire::RangeRequest {
                        from: mid,
                        to: Some(mid),
                        limit: Some(1),
                    },
                )
                .await?;
            let Some(e) = page.entries.first() else {
                return Err(Error::js(
                    "look for a firing in the log",
                    format!("slot {mid} of {process} was not returned"),
                ));
            };
            if e.timestamp_ms < ms {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Makes the coming ticks of the cron jobs in `partitions` into alarms (each
    /// created only if absent) and records the last one planned.
    async fn plan_jobs(&self, partitions: &[u32], now: u64, horizon: u64) {
        if partitions.is_empty() {
            return;
        }
        let jobs = match self.store.jobs(partitions).await {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "reading the cron jobs failed; planning at the next interval");
                return;
            }
        };
        for job in jobs.into_iter().filter_map(|s| s.job).filter(|j| j.active) {
            if let Err(e) = self.plan_job(&job, now, horizon).await {
                warn!(job = %job.name, error = %e, "planning a cron job failed; again at the next interval");
            }
        }
    }

    async fn plan_job(&self, job: &crate::jobs::CronJob, now: u64, horizon: u64) -> Result<()> {
        let dropped = crate::jobs::plan_into(&self.store, job, now, horizon).await?;
        if dropped > 0 {
            self.metrics
                .cron_missed
                .fetch_add(dropped, Ordering::Relaxed);
            info!(job = %job.name, dropped, policy = %job.missed, "cron ticks missed while no loader planned them");
        }
        Ok(())
    }

    /// Whether a cron tick's alarm fires now: skipped (why) when its job was deleted
    /// or deactivated, when the tick is no longer one of the job's schedule (the job
    /// was replaced), and, on its first attempt, when it is late past its missed-run
    /// policy or the last execution that ran has not finished and the job does not
    /// overlap. Fired with the job's current definition (target, body, headers,
    /// timeout, retry), which a replace may have changed since the tick was planned.
    async fn cron_rule(&self, record: &Record, now: u64) -> Result<CronCheck> {
        let Some(tick) = &record.alarm.cron else {
            return Ok(CronCheck::Fire(None));
        };
        let skip = |why: String| Ok(CronCheck::Skip(why));
        let job = match self.store.job(&tick.job).await? {
            Some((crate::jobs::StoredJob { job: Some(job), .. }, _)) => job,
            _ => return skip(format!("cron job {} was deleted", tick.job)),
        };
        if !job.active {
            return skip(format!("cron job {} is inactive", tick.job));
        }
        if !job.is_tick(tick.tick_ms) {
            return skip(format!(
                "not a tick of cron job {}'s current schedule (it was replaced)",
                tick.job
            ));
        }
        let first = matches!(
            record.status,
            crate::alarm::Status::Pending { attempts: 0, .. }
        );
        if first {
            if let Some(reason) = job.late_rule(tick.tick_ms, now) {
                return skip(reason);
            }
            if job.overlap == crate::jobs::Overlap::Skip {
                if let Some(running) = self.running_before(tick).await? {
                    return skip(format!(
                        "overlap: the previous execution ({running}) has not finished"
                    ));
                }
            }
        }
        Ok(CronCheck::Fire(Some(Box::new(job))))
    }

    /// The last tick before `tick` that was not skipped, if it has not finished:
    /// walking back over ticks skipped for the overlap, so a long execution holds off
    /// every tick until it ends, not every other one.
    async fn running_before(&self, tick: &crate::alarm::CronTick) -> Result<Option<String>> {
        let mut previous = tick.after.clone();
        for _ in 0..MAX_OVERLAP_WALK {
            let Some(id) = previous else { return Ok(None) };
            let Some((prev, _)) = self.store.read(&id).await? else {
                return Ok(None);
            };
            match &prev.status {
                crate::alarm::Status::Skipped { reason, .. } if reason.starts_with("overlap") => {
                    previous = prev.alarm.cron.and_then(|c| c.after);
                }
                s if s.is_final() => return Ok(None),
                _ => return Ok(Some(id)),
            }
        }
        Ok(None)
    }

    async fn watch_new_entries(&self, js: &jetstream::Context) -> Result<consumer::push::Ordered> {
        let stream = js
            .get_stream(self.store.subjects().alarms_stream())
            .await
            .map_err(|e| Error::js("due-index watch", e))?;
        let config = consumer::push::OrderedConfig {
            deliver_subject: self.dispatch_inbox(),
            filter_subject: format!("{}.alarms.due.>", self.store.subjects().prefix()),
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        };
        let c = stream
            .create_consumer(config)
            .await
            .map_err(|e| Error::js("due-index watch", e))?;
        c.messages()
            .await
            .map_err(|e| Error::js("due-index watch", e))
    }

    fn dispatch_inbox(&self) -> String {
        format!("_INBOX.{}", uuid::Uuid::new_v4().simple())
    }

    /// Handles the alarm of `entry` (armed for its `at_ms`): fires it if its record says
    /// it is due (claim, dispatch, outcome; the decision is [`timeline::later`]). When
    /// to look at it again, if its record says later, and which of its due-index
    /// entries the record made obsolete (the loop removes them a bucket at a time,
    /// [`Entries`]).
    ///
    /// `hint` is the record as read ahead in a batch: it may be stale, so it is used
    /// only where a compare-and-set follows (a pending firing that is due: its claim);
    /// anything else is decided on a fresh read.
    async fn dispatch(&self, entry: &DueEntry, mut hint: Option<(Record, u64)>) -> Result<Next> {
        let id = entry.id.as_str();
        let grace = u64::try_from(self.config.takeover_grace.as_millis()).unwrap_or(u64::MAX);
        for _ in 0..5 {
            let now = (self.clock)();
            let read = match hint.take() {
                Some((r, seq))
                    if matches!(r.status, crate::alarm::Status::Pending { .. })
                        && r.next_action_ms(grace).is_some_and(|next| next <= now) =>
                {
                    Metrics::bump(&self.metrics.read_ahead);
                    Some((r, seq, seq))
                }
                _ => {
                    let _reading = self
                        .lone_reads
                        .acquire()
                        .await
                        .map_err(|e| Error::js("wait for a turn to read", e))?;
                    let c = self
                        .metrics
                        .timed(Stage::Read, Box::pin(self.store.current(id)))
                        .await?;
                    c.record.map(|(r, rseq)| (r, c.last_seq, rseq))
                }
            };
            // `seq`: what a write expects (the subject's last message, which may be
            // foreign); `rseq`: the record's own, by which its entries are settled (an
            // entry stored after it, even before a foreign message, waits for its own).
            // An entry is written before the record that needs it: a young entry the
            // record does not (yet) account for may be waiting for that record, so it
            // is looked at again; an old one is an orphan (its record never came).
            let Some((record, seq, rseq)) = read else {
                return Ok(timeline::unrecorded(entry, now));
            };
            // This dispatch's share of the bodies in flight, for its rest.
            let kib = u32::try_from(record.alarm.body.len().div_ceil(1024))
                .unwrap_or(u32::MAX)
                .min(DISPATCH_BODY_BUDGET_KIB);
            let _bodies = self
                .bodies
                .acquire_many(kib)
                .await
                .map_err(|e| Error::js("wait for room for a body", e))?;
            if let Some(next) = timeline::later(entry, &record, rseq, now, grace) {
                return Ok(next);
            }
            let mut record = record;
            match Box::pin(self.cron_rule(&record, now)).await? {
                CronCheck::Skip(reason) => {
                    let Some(skipped) = record.skipped(now, &reason) else {
                        return Ok(Next::settled(None, rseq, None));
                    };
                    match Box::pin(self.store.append(&skipped, seq)).await {
                        Ok(skipped_seq) => {
                            Metrics::bump(&self.metrics.skipped);
                            return Ok(Next::settled(None, skipped_seq, None));
                        }
                        Err(Error::Conflict(_)) => {
                            Metrics::bump(&self.metrics.conflicts);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                // A tick not attempted yet fires the job as it is now (a replaced job's
                // pending ticks carry its new definition). Once attempted, a tick keeps
                // what its first attempt sent (its claim stored it): a retry or a
                // takeover looks for that attempt in the log by id and content, and
                // where it went, and must send the same again, or an attempt that
                // landed would be missed and the tick fired twice (or, its id taken by
                // a content it no longer knows, dead though delivered).
                CronCheck::Fire(Some(job))
                    if matches!(
                        record.status,
                        crate::alarm::Status::Pending { attempts: 0, .. }
                    ) =>
                {
                    let current = job.tick_alarm(0, None);
                    record.alarm.target = current.target;
                    record.alarm.body = current.body;
                    record.alarm.headers = current.headers;
                    record.alarm.dispatch_timeout_ms = current.dispatch_timeout_ms;
                    record.alarm.retry = current.retry;
                }
                CronCheck::Fire(_) => {}
            }
            let Some(claim) = record.claim(now, &self.config.replica) else {
                return Ok(Next::settled(None, rseq, None));
            };
            let claimed = self
                .metrics
                .timed(Stage::Claim, Box::pin(self.store.append(&claim, seq)))
                .await;
            let claim_seq = match claimed {
                Ok(s) => s,
                Err(Error::Conflict(_)) => {
                    Metrics::bump(&self.metrics.conflicts);
                    continue;
                }
                Err(e) => return Err(e),
            };
            Metrics::bump(&self.metrics.dispatched);
            // An earlier attempt of this firing may be in the log already, beyond the
            // scheduler's idempotency window, where the same message id would get a new
            // slot: a claim taken over from a loader that died mid-dispatch (every
            // loader down for longer), or a retry after an attempt that failed on our
            // side (a timeout) but landed (the backoff may outlast the window). Every
            // attempt of a firing is sent at or after its due time: look there first.
            let firing = claim.firing_id(self.store.firing_key());
            let earlier_until = match &record.status {
                crate::alarm::Status::Dispatching { .. } => {
                    Metrics::bump(&self.metrics.takeovers);
                    Some(now)
                }
                // Unless every attempt so far was refused with nothing written.
                crate::alarm::Status::Pending { attempts, .. } if *attempts > 0 => {
                    if self.unwritten.take(&firing) {
                        None
                    } else if let crate::alarm::Event::Failed { at_ms, .. } = record.event {
                        Some(at_ms)
                    } else {
                        Some(now)
                    }
                }
                _ => None,
            };
            // Whether this firing can be in the log from an earlier attempt: if not, and
            // this attempt too writes nothing, its retry need not look.
            let clean = earlier_until.is_none();
            let found = match (&record.alarm.target, earlier_until) {
                (Target::Process(p), Some(until)) => {
                    Metrics::bump(&self.metrics.firing_lookups);
                    match Box::pin(self.find_firing(p, &record, record.alarm.due_ms, until)).await {
                        Ok(found) => found,
                        Err(e) => {
                            // Sent again now, it might be written twice: the claim stays,
                            // and its takeover (this loader's or another's) looks again.
                            Metrics::bump(&self.metrics.firing_lookups_failed);
                            warn!(alarm = %id, error = %e, "could not look for an earlier attempt in the log; trying again at the claim's takeover");
                            return Ok(Next::after_outcome(&claim, claim_seq, grace));
                        }
                    }
                }
                _ => None,
            };
            if found.is_some() {
                Metrics::bump(&self.metrics.firings_found);
            }
            let fired = match found {
                Some(slot) => Fired::Delivered {
                    slot: Some(slot),
                    duplicate: true,
                },
                None => {
                    self.metrics
                        .timed(Stage::Fire, Box::pin(self.fire(&claim)))
                        .await
                }
            };
            let done = (self.clock)();
            let (outcome, dead) = match fired {
                Fired::Delivered { slot, duplicate } => {
                    Metrics::bump(&self.metrics.delivered);
                    let r = claim.delivered(done, slot, duplicate);
                    if let crate::alarm::Event::Delivered { lateness_ms, .. } = r.event {
                        self.metrics.lateness(lateness_ms);
                    }
                    (r, false)
                }
                Fired::RetryAsked { in_ms, body } => {
                    Metrics::bump(&self.metrics.retries_asked);
                    (claim.retry_asked(done, in_ms, body), false)
                }
                Fired::Failed(ref reason) | Fired::Refused(ref reason) => {
                    Metrics::bump(&self.metrics.failed);
                    debug!(alarm = %id, %reason, "dispatch failed");
                    let (outcome, dead) = claim.failed(done, reason);
                    if clean && !dead && matches!(fired, Fired::Refused(_)) {
                        self.unwritten.insert(firing);
                    }
                    (outcome, dead)
                }
            };
            if let Some(at) = outcome.next_action_ms(grace) {
                // The entry first, then the record that needs it.
                Box::pin(self.store.put_due(id, at, done)).await?;
            }
            if dead {
                // The dead letter first, then the record that ends the alarm: a crash
                // in between leaves the claim, whose takeover tries the last attempt
                // again (a second dead letter at worst), never a dead alarm whose
                // letter was not sent.
                Box::pin(self.store.dead_letter(&outcome)).await?;
                Metrics::bump(&self.metrics.dead);
            }
            // What stands is what was appended: the outcome, or (when a client changed
            // the alarm meanwhile) the client's state with the outcome as its event.
            let (last, last_seq) = self
                .metrics
                .timed(
                    Stage::Outcome,
                    Box::pin(self.record_outcome(&outcome, &claim, claim_seq)),
                )
                .await?;
            return Ok(Next::after_outcome(&last, last_seq, grace));
        }
        // Lost every compare-and-set: another loader is on it; look again soon.
        Ok(Next::again((self.clock)()))
    }

    /// Appends a dispatch's outcome after its claim (stored at `claim_seq`). When that
    /// compare-and-set fails, or its fate is unknown, the alarm is read again: if the
    /// outcome landed, that is it; if the record still stands as the claim left it (a
    /// foreign message came after it, or the failed write did not land), the outcome
    /// is written again after what is there now, so the claim ends here rather than at
    /// its takeover; if a client changed the alarm meanwhile (replaced, cancelled), the
    /// outcome is still recorded as an event, and the state the client gave stands.
    /// The record appended last, and its sequence.
    async fn record_outcome(
        &self,
        outcome: &Record,
        claim: &Record,
        claim_seq: u64,
    ) -> Result<(Record, u64)> {
        let mut expected = claim_seq;
        let mut record = outcome.clone();
        for round in 0..OUTCOME_WRITES {
            match self.store.append(&record, expected).await {
                Ok(seq) => return Ok((record, seq)),
                Err(Error::Conflict(_)) => Metrics::bump(&self.metrics.conflicts),
                Err(e) => {
                    // Perhaps stored, perhaps not: the read below tells.
                    debug!(alarm = %record.alarm.id, error = %e, "writing a dispatch's outcome failed; reading the alarm again");
                    tokio::time::sleep(Duration::from_millis(200 * (round as u64 + 1))).await;
                }
            }
            let current = self.store.current(&record.alarm.id).await?;
            let Some((stands, stands_seq)) = current.record else {
                return Err(Error::Conflict(record.alarm.id));
            };
            if stands == record {
                return Ok((stands, stands_seq));
            }
            // As the claim left it: its state, whatever event is on it (an older
            // claim's outcome may have been recorded as an event over it; compared
            // whole, that record counted as a client's change, and this claim's
            // outcome was written as one more event: the alarm stayed `dispatching`
            // until the takeover).
            let as_claim_left = Record {
                event: claim.event.clone(),
                ..stands.clone()
            } == *claim;
            record = if as_claim_left {
                outcome.clone()
            } else {
                Record {
                    event: outcome.event.clone(),
                    ..stands
                }
            };
            expected = current.last_seq;
        }
        Err(Error::Conflict(record.alarm.id))
    }

    /// The scheduler answered a firing as a duplicate: the receipt is of the entry
    /// first written under the firing's message id (its stored headers and the BLAKE3
    /// of its body, read from the signed run). It is this firing's earlier attempt only
    /// if it carries the firing ([`Record::is_fired_as`]); an entry a client wrote
    /// first under the id fails the attempt (retried, then dead with the reason)
    /// rather than passing for it.
    fn duplicate_of(
        &self,
        process: &protocol::ProcessId,
        claim: &Record,
        r: &protocol::wire::Receipt,
    ) -> Fired {
        if claim.is_fired_as(&r.body_hash, &r.headers) {
            return Fired::Delivered {
                slot: Some(r.slot),
                duplicate: true,
            };
        }
        Metrics::bump(&self.metrics.firing_ids_taken);
        Fired::Failed(format!(
            "message id {} is taken in the log of {process} by another message (slot {}): not this alarm's firing",
            claim.firing_id(self.store.firing_key()),
            r.slot
        ))
    }

    async fn fire(&self, claim: &Record) -> Fired {
        let a = &claim.alarm;
        let timeout = Duration::from_millis(a.dispatch_timeout_ms);
        match &a.target {
            Target::Process(p) => {
                let Ok(process) = protocol::ProcessId::new(p) else {
                    return Fired::Failed(format!("invalid process {p}"));
                };
                let opts = Schedule {
                    message_id: Some(claim.firing_id(self.store.firing_key())),
                    mode: None,
                    headers: a.headers.clone(),
                };
                match self
                    .scheduler
                    .clone()
                    .with_timeout(timeout)
                    .schedule(&process, Bytes::from(a.body.clone()), &opts)
                    .await
                {
                    Ok(r) if r.duplicate => self.duplicate_of(&process, claim, &r),
                    Ok(r) => Fired::Delivered {
                        slot: Some(r.slot),
                        duplicate: false,
                    },
                    Err(e) if wrote_nothing(&e) => Fired::Refused(e.to_string()),
                    Err(e) => Fired::Failed(e.to_string()),
                }
            }
            Target::Subject(s) if a.cron.as_ref().is_some_and(|c| c.fan_out.is_some()) => {
                let group = a
                    .cron
                    .as_ref()
                    .and_then(|c| c.fan_out.clone())
                    .unwrap_or_default();
                Box::pin(self.fan_out(claim, s, &group, timeout)).await
            }
            Target::Subject(s) => Box::pin(self.request(claim, s.clone(), timeout)).await,
        }
    }

    /// Sends a cron tick to every live instance of worker group `group`: those that
    /// answer `$SRV.PING.<group>` within [`DISCOVERY`], each on `<subject>.<id>`.
    /// Delivered when every one answered ok; a failure of any is the attempt's (a retry
    /// sends to all again: instances deduplicate on `Ts-Alarm-Firing`).
    async fn fan_out(
        &self,
        claim: &Record,
        subject: &str,
        group: &str,
        timeout: Duration,
    ) -> Fired {
        let instances = match self.instances(group).await {
            Ok(i) if !i.is_empty() => i,
            Ok(_) => return Fired::Failed(format!("no live instance of worker group {group}")),
            Err(e) => return Fired::Failed(format!("discovering worker group {group}: {e}")),
        };
        let sends = instances
            .iter()
            .map(|id| self.request(claim, format!("{subject}.{id}"), timeout));
        let results = futures::future::join_all(sends).await;
        let failed: Vec<String> = instances
            .iter()
            .zip(results)
            .filter_map(|(id, r)| match r {
                Fired::Delivered { .. } => None,
                Fired::Failed(why) | Fired::Refused(why) => Some(format!("{id}: {why}")),
                Fired::RetryAsked { .. } => Some(format!("{id}: asked for a retry")),
            })
            .collect();
        if failed.is_empty() {
            Fired::Delivered {
                slot: None,
                duplicate: false,
            }
        } else {
            Fired::Failed(format!(
                "{} of {} instances: {}",
                failed.len(),
                instances.len(),
                failed.join("; ")
            ))
        }
    }

    /// The ids of the live instances of `group` (services-API PING).
    async fn instances(&self, group: &str) -> Result<Vec<String>> {
        let ids: BTreeSet<String> = service::ask_all(&self.dispatch, "PING", group, DISCOVERY)
            .await
            .map_err(|e| Error::js("discover instances", e))?
            .into_iter()
            .filter_map(|v| v["id"].as_str().map(str::to_string))
            .filter(|id| crate::alarm::is_token(id, 64))
            .collect();
        Ok(ids.into_iter().collect())
    }

    /// One request to a subject target.
    async fn request(&self, claim: &Record, subject: String, timeout: Duration) -> Fired {
        let a = &claim.alarm;
        let mut h = HeaderMap::new();
        for (k, v) in &a.headers {
            h.append(k.as_str(), v.as_str());
        }
        h.insert("Ts-Alarm-Id", a.id.as_str());
        h.insert(
            "Ts-Alarm-Firing",
            claim.firing_id(self.store.firing_key()).as_str(),
        );
        h.insert("Ts-Alarm-Due-Ms", a.due_ms.to_string().as_str());
        if let crate::alarm::Status::Dispatching { attempt, .. } = claim.status {
            h.insert("Ts-Alarm-Attempt", attempt.to_string().as_str());
        }
        let req = async_nats::Request::new()
            .payload(Bytes::from(a.body.clone()))
            .headers(h)
            .timeout(Some(timeout));
        match self.dispatch.send_request(subject, req).await {
            Ok(m) => answer_of(&m),
            Err(e) => Fired::Failed(match e.kind() {
                async_nats::RequestErrorKind::TimedOut => {
                    format!("no answer within {} ms", a.dispatch_timeout_ms)
                }
                async_nats::RequestErrorKind::NoResponders => "no responders".into(),
                _ => e.to_string(),
            }),
        }
    }
}

/// What a subject target's reply says.
fn answer_of(m: &async_nats::Message) -> Fired {
    if let Some(e) = journal::client::refusal(m) {
        return Fired::Failed(e.to_string());
    }
    if m.payload.iter().all(u8::is_ascii_whitespace) {
        return Fired::Delivered {
            slot: None,
            duplicate: false,
        };
    }
    match serde_json::from_slice::<Answer>(&m.payload) {
        Ok(Answer::Ok) => Fired::Delivered {
            slot: None,
            duplicate: false,
        },
        Ok(Answer::Retry { in_ms, body_base64 }) => {
            use base64::Engine as _;
            let body = match body_base64 {
                Some(b) => match base64::engine::general_purpose::STANDARD.decode(b) {
                    Ok(b) if b.len() <= crate::alarm::MAX_BODY => Some(b),
                    _ => {
                        return Fired::Failed(
                            "retry answer: body_base64 invalid or too large".into(),
                        )
                    }
                },
                None => None,
            };
            // Not sooner than MIN_RETRY_MS: a responder answering "retry in 0" must
            // not make a tight loop.
            Fired::RetryAsked {
                in_ms: in_ms.clamp(MIN_RETRY_MS, 366 * 24 * 3600 * 1000),
                body,
            }
        }
        Ok(Answer::Error { reason }) => Fired::Failed(format!("target error: {reason}")),
        Err(e) => Fired::Failed(format!("unintelligible answer: {e}")),
    }
}

/// The partitions held, each with its lease and the lease's token.
#[derive(Debug)]
struct Holdings<L> {
    by_partition: HashMap<u32, (u64, L)>,
}

impl<L> Default for Holdings<L> {
    fn default() -> Self {
        Holdings {
            by_partition: HashMap::new(),
        }
    }
}

impl<L> Holdings<L> {
    /// Holds partition `p` under `lease` (token `token`), replacing an earlier lease.
    fn insert(&mut self, p: u32, token: u64, lease: L) {
        self.by_partition.insert(p, (token, lease));
    }

    /// The loss of partition `p`'s lease `token`: forgets the partition and returns
    /// true if that lease is the one held; false (nothing changes) if the partition is
    /// held under another lease, or not at all.
    fn lose(&mut self, p: u32, token: u64) -> bool {
        match self.by_partition.get(&p) {
            Some((held, _)) if *held == token => {
                self.by_partition.remove(&p);
                true
            }
            _ => false,
        }
    }

    fn contains_key(&self, p: &u32) -> bool {
        self.by_partition.contains_key(p)
    }

    /// The token of the lease partition `p` is held under.
    fn token(&self, p: u32) -> Option<u64> {
        self.by_partition.get(&p).map(|(token, _)| *token)
    }

    fn len(&self) -> usize {
        self.by_partition.len()
    }

    fn partitions(&self) -> Vec<u32> {
        self.by_partition.keys().copied().collect()
    }
}

/// How far a partition's checkpoint may move this round: from `done` over the
/// buckets before `limit` that are empty.
struct SweepPlan {
    p: u32,
    done: u64,
    limit: u64,
}

/// Spawns the loop's upkeep beside it: a task that panics is reported by name on
/// `panicked` (the loop then ends with [`Error::Panicked`]).
struct Beside {
    tracker: tokio_util::task::TaskTracker,
    panicked: tokio::sync::mpsc::UnboundedSender<&'static str>,
}

impl Beside {
    fn spawn<F>(&self, what: &'static str, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let panicked = self.panicked.clone();
        self.tracker.spawn(async move {
            if std::panic::AssertUnwindSafe(task)
                .catch_unwind()
                .await
                .is_err()
            {
                let _ = panicked.send(what);
            }
        });
    }
}

/// A partition's catch-up, sent back to the loop: the lease it was read under, the
/// ask it answers, and the checkpoint and entries read (none: failed).
struct Caught {
    p: u32,
    token: u64,
    ask: u64,
    read: Option<(u64, Vec<DueEntry>)>,
}

/// A window load's result, sent back to the loop.
struct Loaded {
    /// The last bucket read.
    until: u64,
    /// The partitions read.
    owned: Vec<u32>,
    started: std::time::Instant,
    /// The entries, and the subjects that hold none.
    read: Result<crate::store::Checked>,
}

/// The due-index entries this loader has seen (and armed), by partition and bucket:
/// those not yet settled (open), and those settled and not yet removed. A past bucket
/// with none left open has its settled entries removed one by one, each by its own
/// subject below the sequence of the record that settled it (an entry stored after
/// that waits for its own record). A purge of the whole bucket by a wildcard filter
/// costs the server a scan of every message block holding one of the bucket's
/// entries: with alarms set over days for the same ten seconds, that is most of the
/// stream, per bucket and partition (57 ms a purge on a stream of 400,000 messages
/// here); a purge by one subject is found through the server's subject index (about
/// 40 µs, whatever the stream holds).
#[derive(Debug, Default)]
struct Open {
    /// Partition → bucket → alarm → the highest sequence of its entries seen there.
    entries: HashMap<u32, BTreeMap<u64, HashMap<String, u64>>>,
    /// (Partition, bucket) → alarm → the sequence below which its entries there are
    /// obsolete (settled, not yet removed).
    settled: BTreeMap<(u32, u64), HashMap<String, u64>>,
    /// Buckets whose removal is under way.
    removing: BTreeSet<(u32, u64)>,
}

/// Settled entries of one bucket to remove: (alarm, below which).
type Removal = Vec<(String, u64)>;

impl Open {
    /// An entry read from the stream and armed.
    fn note(&mut self, e: &DueEntry) {
        if e.seq == 0 {
            return;
        }
        let (p, b) = (partition_of(&e.id), bucket_of(e.at_ms));
        let s = self
            .entries
            .entry(p)
            .or_default()
            .entry(b)
            .or_default()
            .entry(e.id.clone())
            .or_insert(0);
        *s = (*s).max(e.seq);
    }

    /// A dispatch's conclusion about alarm `id`'s entries.
    fn settle(&mut self, id: &str, entries: Entries) {
        let Entries::Settled { seq, except } = entries else {
            return;
        };
        let keep = except.map(bucket_of);
        let p = partition_of(id);
        let Some(buckets) = self.entries.get_mut(&p) else {
            return;
        };
        let settled = &mut self.settled;
        buckets.retain(|b, ids| {
            if Some(*b) != keep && ids.get(id).is_some_and(|&s| s < seq) {
                ids.remove(id);
                let below = settled
                    .entry((p, *b))
                    .or_default()
                    .entry(id.to_string())
                    .or_insert(0);
                *below = (*below).max(seq);
            }
            !ids.is_empty()
        });
    }

    /// Partition `p` given up: what was seen there is forgotten (a removal under way
    /// ends on its own; what it leaves, the next holder settles again).
    fn forget(&mut self, p: u32) {
        self.entries.remove(&p);
        self.settled.retain(|(q, _), _| *q != p);
        self.removing.retain(|(q, _)| *q != p);
    }

    /// Whether every entry seen in bucket `b` of partition `p` is settled.
    fn quiet(&self, p: u32, b: u64) -> bool {
        self.entries
            .get(&p)
            .and_then(|m| m.get(&b))
            .is_none_or(HashMap::is_empty)
    }

    /// The buckets of partition `p` after `done` and before the one before
    /// `now_bucket` with settled entries to remove, in order.
    fn past_buckets(&self, p: u32, done: u64, now_bucket: u64) -> Vec<u64> {
        if done.saturating_add(1) >= now_bucket.saturating_sub(1) {
            return Vec::new();
        }
        self.settled
            .range((p, done.saturating_add(1))..(p, now_bucket.saturating_sub(1)))
            .map(|((_, b), _)| *b)
            .collect()
    }

    /// The settled entries of bucket `b` of partition `p` to remove now: none while
    /// some entry there is open or a removal is under way.
    fn take_removal(&mut self, p: u32, b: u64) -> Option<Removal> {
        if !self.quiet(p, b) || self.removing.contains(&(p, b)) {
            return None;
        }
        let ids = self.settled.remove(&(p, b))?;
        self.removing.insert((p, b));
        Some(ids.into_iter().collect())
    }

    /// A removal of bucket `b` of partition `p` ended; `failed` are to try again.
    fn removed(&mut self, p: u32, b: u64, failed: Removal) {
        if !self.removing.remove(&(p, b)) {
            // The partition was given up meanwhile.
            return;
        }
        if failed.is_empty() {
            return;
        }
        let ids = self.settled.entry((p, b)).or_default();
        for (id, below) in failed {
            let s = ids.entry(id).or_insert(0);
            *s = (*s).max(below);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every firing is a task holding this future: its steps' futures are boxed
    /// (7.3 KB inline, copied by tokio at spawn: a tenth of a busy loader's CPU was
    /// `memmove`).
    #[test]
    fn a_dispatchs_future_stays_small() {
        fn size<A, B, C, F>(_f: fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let bytes = size(super::Loader::dispatch);
        assert!(bytes <= 4096, "dispatch's future is {bytes} bytes");
    }

    #[tokio::test]
    async fn a_task_beside_the_loop_that_panics_is_reported_by_name() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let tracker = tokio_util::task::TaskTracker::new();
        let beside = super::Beside {
            tracker: tracker.clone(),
            panicked: tx,
        };
        beside.spawn("fine", async {});
        beside.spawn("window load", async { panic!("a defect") });
        beside.spawn("also fine", async {});
        tracker.close();
        tracker.wait().await;
        drop(beside);
        assert_eq!(rx.recv().await, Some("window load"));
        assert_eq!(
            rx.recv().await,
            None,
            "only the task that panicked is reported"
        );
    }

    use super::*;

    fn msg(payload: &[u8], headers: Option<HeaderMap>) -> async_nats::Message {
        async_nats::Message {
            subject: "x".into(),
            reply: None,
            payload: Bytes::copy_from_slice(payload),
            headers,
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn only_a_refusal_that_wrote_nothing_spares_the_retry_its_look_in_the_log() {
        use protocol::wire::ErrorCode as C;
        let refused = |code| journal::Error::Refused {
            code,
            message: String::new(),
        };
        for code in [
            C::Busy,
            C::Disabled,
            C::TooLarge,
            C::LogFull,
            C::QueueKeyHeld,
        ] {
            assert!(wrote_nothing(&refused(code)), "{code:?}");
        }
        // Perhaps written: the log must be read before the same id is sent again.
        for code in [C::Unavailable, C::RemoteTimeout, C::Internal] {
            assert!(!wrote_nothing(&refused(code)), "{code:?}");
        }
        assert!(!wrote_nothing(&journal::Error::Timeout(
            "ts.schedule.p".into()
        )));
        assert!(wrote_nothing(&journal::Error::NoResponders(
            "ts.schedule.p".into()
        )));
        let seen = Unwritten::default();
        seen.insert("alarm-a-1-2".into());
        assert!(seen.take("alarm-a-1-2"));
        assert!(!seen.take("alarm-a-1-2"), "taken once");
    }

    #[test]
    fn a_skewed_clock_is_the_system_clock_shifted() {
        let (system, ahead, behind) = (system_clock(), skewed_clock(5_000), skewed_clock(-5_000));
        let before = system();
        let (a, b) = (ahead(), behind());
        let after = system();
        assert!(
            (before + 5_000..=after + 5_000).contains(&a),
            "{a} vs {before}..{after}"
        );
        assert!(
            (before..=after).contains(&(b + 5_000)),
            "{b} vs {before}..{after}"
        );
        assert_eq!(skewed_clock(-i64::MAX)(), 0, "saturates at the epoch");
    }

    #[test]
    fn subject_answers_are_read_as_documented() {
        assert!(matches!(
            answer_of(&msg(b"", None)),
            Fired::Delivered { .. }
        ));
        assert!(matches!(
            answer_of(&msg(br#"{"result":"ok"}"#, None)),
            Fired::Delivered { .. }
        ));
        match answer_of(&msg(
            br#"{"result":"retry","in_ms":250,"body_base64":"aGk="}"#,
            None,
        )) {
            Fired::RetryAsked { in_ms, body } => {
                assert_eq!(in_ms, 250);
                assert_eq!(body.as_deref(), Some(&b"hi"[..]));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(answer_of(&msg(br#"{"result":"error","reason":"x"}"#, None)), Fired::Failed(r) if r.contains('x'))
        );
        assert!(matches!(
            answer_of(&msg(b"\xff\xfe", None)),
            Fired::Failed(_)
        ));
        let mut h = HeaderMap::new();
        h.insert("Ts-Error", "busy");
        assert!(matches!(answer_of(&msg(b"", Some(h))), Fired::Failed(_)));
    }

    /// The loop may be busy (a slow round) while the membership gives a lease up,
    /// releases it and acquires the partition anew: the new lease and the old one's
    /// loss are then both waiting, in either order. The old loss must not drop the
    /// new lease (the partition would stay held, renewed, and never fired).
    #[test]
    fn a_stale_loss_does_not_drop_the_lease_taken_since() {
        let mut h = Holdings::default();
        h.insert(7, 10, "first");
        // The new lease is read before the old one's loss.
        h.insert(7, 25, "second");
        assert!(!h.lose(7, 10), "the loss of lease 10 is stale");
        assert!(h.contains_key(&7));
        assert_eq!(h.partitions(), vec![7]);
        // The new lease's own loss ends it.
        assert!(h.lose(7, 25));
        assert!(!h.contains_key(&7));
        assert_eq!(h.len(), 0);
        // The other order: the old loss first, then the new lease.
        h.insert(3, 1, "old");
        assert!(h.lose(3, 1));
        h.insert(3, 2, "new");
        assert!(h.contains_key(&3));
        assert!(!h.lose(4, 2), "a partition not held");
    }

    #[test]
    fn lateness_percentiles_are_those_of_the_samples_in_any_order() {
        let m = Metrics::default();
        for v in (1..=100).rev() {
            m.lateness(v);
        }
        let l = &m.snapshot()["lateness_ms"];
        assert_eq!(l["samples"], 100);
        assert_eq!(l["p50"], 51);
        assert_eq!(l["p99"], 99);
        assert_eq!(l["max"], 100);
        assert!(Metrics::default().snapshot()["lateness_ms"]["p50"].is_null());
    }

    #[test]
    fn each_dispatch_step_keeps_its_own_durations_and_only_the_last_ones() {
        let m = Metrics::default();
        for us in 1..=(STAGE_SAMPLES as u64 + 10) {
            m.stage(Stage::Claim, Duration::from_micros(us));
        }
        m.stage(Stage::Fire, Duration::from_millis(3));
        let d = &m.snapshot()["dispatch_us"];
        assert_eq!(d["claim"]["samples"], STAGE_SAMPLES);
        assert_eq!(d["claim"]["max"], STAGE_SAMPLES as u64 + 10);
        // The ten oldest were dropped: the smallest left is 11.
        assert_eq!(d["claim"]["p50"], 11 + STAGE_SAMPLES as u64 / 2);
        assert_eq!(d["fire"]["samples"], 1);
        assert_eq!(d["fire"]["p99"], 3_000);
        assert_eq!(d["read"]["samples"], 0);
        assert!(d["outcome"]["p50"].is_null());
    }

    fn entry(id: &str, at_ms: u64, seq: u64) -> DueEntry {
        DueEntry {
            id: id.into(),
            at_ms,
            written_ms: 0,
            seq,
        }
    }

    /// Two alarms of one partition, so that they share buckets.
    fn two_in_one_partition() -> (String, String) {
        let first = "a0".to_string();
        let p = partition_of(&first);
        let second = (1..10_000)
            .map(|i| format!("a{i}"))
            .find(|id| partition_of(id) == p)
            .unwrap_or_default();
        assert!(!second.is_empty());
        (first, second)
    }

    #[test]
    fn a_bucket_is_quiet_only_when_every_entry_seen_in_it_is_settled() {
        let (x, y) = two_in_one_partition();
        let p = partition_of(&x);
        let mut open = Open::default();
        // Nothing seen: quiet, nothing to remove (the sweep still checks it is empty).
        assert!(open.quiet(p, 1));
        assert_eq!(open.take_removal(p, 1), None);
        open.note(&entry(&x, 10_000, 5));
        open.note(&entry(&y, 12_000, 9));
        assert!(!open.quiet(p, 1));
        open.settle(
            &x,
            Entries::Settled {
                seq: 6,
                except: None,
            },
        );
        assert!(!open.quiet(p, 1), "y is still open");
        assert_eq!(open.take_removal(p, 1), None, "not while y is open");
        open.settle(&y, Entries::Keep);
        assert!(!open.quiet(p, 1), "keep settles nothing");
        open.settle(
            &y,
            Entries::Settled {
                seq: 10,
                except: None,
            },
        );
        assert!(open.quiet(p, 1));
        assert_eq!(open.past_buckets(p, 0, 3), vec![1]);
        assert_eq!(
            open.past_buckets(p, 0, 2),
            Vec::<u64>::new(),
            "not the bucket before now's"
        );
        assert_eq!(
            open.past_buckets(p, 1, 3),
            Vec::<u64>::new(),
            "not behind the checkpoint"
        );
        // Each alarm's entries removed below the record that settled them.
        let mut r = open.take_removal(p, 1).unwrap_or_default();
        r.sort();
        let mut want = vec![(x.clone(), 6), (y.clone(), 10)];
        want.sort();
        assert_eq!(r, want);
        assert_eq!(open.take_removal(p, 1), None, "handed out once");
        // One removal failed: handed out again at the next sweep, not before it ended.
        open.removed(p, 1, vec![(y.clone(), 10)]);
        assert_eq!(open.take_removal(p, 1), Some(vec![(y.clone(), 10)]));
        open.removed(p, 1, Vec::new());
        assert_eq!(open.take_removal(p, 1), None);
        assert!(open.past_buckets(p, 0, 3).is_empty());
        // An entry without a known sequence is never counted (nor removed by it).
        open.note(&entry(&x, 10_000, 0));
        assert!(open.quiet(p, 1));
    }

    #[test]
    fn a_sweep_plans_checkpoints_over_settled_buckets_a_minute_behind_and_hands_out_removals() {
        let (x, y) = two_in_one_partition();
        let p = partition_of(&x);
        let mut open = Open::default();
        // Now is bucket 106; the checkpoint may not pass a minute before: bucket 100.
        let now = 106 * 10_000 + 5_000;
        let swept = HashMap::from([(p, 90)]);
        let mut removals = Vec::new();
        let plans = Loader::plan_sweep(&[p, p + 1], &swept, &mut open, now, &mut removals);
        assert_eq!(
            plans.len(),
            1,
            "a partition without a checkpoint is not swept"
        );
        assert_eq!((plans[0].p, plans[0].done, plans[0].limit), (p, 90, 99));
        assert!(removals.is_empty());
        // An entry still open in bucket 95 stops it there; a settled one in bucket 93
        // is handed out for removal.
        open.note(&entry(&x, 95_000 * 10, 7));
        open.note(&entry(&y, 93_000 * 10, 4));
        open.settle(
            &y,
            Entries::Settled {
                seq: 5,
                except: None,
            },
        );
        let plans = Loader::plan_sweep(&[p], &swept, &mut open, now, &mut removals);
        assert_eq!((plans[0].done, plans[0].limit), (90, 95));
        assert_eq!(removals, vec![(p, 93, vec![(y.clone(), 5)])]);
        // Nothing to check: no plan.
        let swept = HashMap::from([(p, 98)]);
        assert!(Loader::plan_sweep(&[p], &swept, &mut open, now, &mut Vec::new()).is_empty());
    }

    #[test]
    fn a_record_settles_only_the_entries_stored_before_it_and_keeps_the_one_it_needs() {
        let (x, _) = two_in_one_partition();
        let p = partition_of(&x);
        let mut open = Open::default();
        open.note(&entry(&x, 10_000, 5)); // bucket 1, the old due time
        open.note(&entry(&x, 30_000, 7)); // bucket 3, the new one (a replace)
        open.note(&entry(&x, 50_000, 12)); // bucket 5, written after the record at 8
                                           // The record at 8 needs its action at 30_000: bucket 3's entry stays.
        open.settle(
            &x,
            Entries::Settled {
                seq: 8,
                except: Some(31_000),
            },
        );
        assert_eq!(open.take_removal(p, 1), Some(vec![(x.clone(), 8)]));
        assert!(!open.quiet(p, 3));
        assert!(
            !open.quiet(p, 5),
            "stored after the record: waits for its own"
        );
        assert_eq!(open.past_buckets(p, 0, 10), Vec::<u64>::new());
        // Given up: forgotten, and a removal under way that ends after is ignored.
        open.forget(p);
        assert!(open.quiet(p, 3));
        assert!(open.quiet(p, 5));
        open.removed(p, 1, vec![(x.clone(), 8)]);
        assert_eq!(open.take_removal(p, 1), None);
    }
}
