//! `make chaos DURATION=<seconds> [SEED=<n>] [CLUSTER=1] [ALARMS=1]`: the scheduler
//! (or the alarm-loader) under injected faults, checked from the log (and the
//! alarms' histories).
//!
//! Several scheduler replicas (the real binary, `target/<profile>/scheduler`, each
//! with its output in a log file) run against a private nats-server, or with
//! `--cluster` a private 3-node JetStream cluster (below). A seeded random
//! workload runs for `--duration` seconds: steady clients over a few hundred processes,
//! and at seeded times bursts (hundreds of requests at once to one process), overload
//! (as many requests in flight as the harness can keep for a few seconds), big bodies
//! (at the limit, one byte past it, and many near 1 MiB at once), one request to each
//! of hundreds of new processes, and the same id sent twice at once (the queue group
//! gives the twins to different replicas most of the time). Half the requests carry a
//! `Nats-Msg-Id`; bodies run from 0 bytes to the scheduler's limit (`$SRV.INFO`), and
//! every request carries a unique token (a `Chaos-Token` header, and the body's first
//! bytes) so that it can be found in the log. A request with an id is retried with the
//! same id and body when its fate is unknown or its refusal says to retry; one without
//! an id never is (a retry would be a new request).
//!
//! Meanwhile a seeded schedule injects one fault at a time, each followed by recovery
//! (every replica answers PING) and a pause: nats-server stalled (SIGSTOP 2–10 s) or
//! killed (SIGKILL, restarted on the same port and store), a replica killed (SIGKILL)
//! or stopped (SIGTERM) and restarted, a replica restarted with its clock skewed
//! (`--clock-skew-ms`, ±1–20 s) or with other flags (`--max-run-entries`,
//! `--dedupe-window-secs`, `--singles-in-flight`) for a while, and a full store (the
//! log stream's `max_bytes` lowered to its size for a few seconds).
//!
//! With `--cluster` (`make chaos CLUSTER=1`) the replicas run against three nodes of
//! deploy/nats-cluster.conf (`harness::NatsCluster`; its `sync_interval: always`
//! fsyncs every write), started as deploy/ says for a cluster: `--replicas 3` (the log
//! and the buckets R3) and `--singles-in-flight 16`, every connection (replicas,
//! clients, the oracle, `turnstile verify`) given every node's URL. The server's stall
//! and kill become a node's, and leader changes join them: a node stalled (SIGSTOP
//! 2–10 s; half the time the one that leads `TS_LOG`, else another), a node that does
//! not lead the log killed (SIGKILL, restarted in place after 0–5 s), the log's leader
//! killed (SIGKILL, restarted in place after 1–8 s: the other two elect a leader
//! meanwhile), and a stream's leader asked to step down
//! (`$JS.API.STREAM.LEADER.STEPDOWN.<stream>` as the operator: `TS_LOG` half the time,
//! else the settings or the keys bucket, which every replica watches). After each of
//! these the harness waits (up to 60 s; it notes how long, or that it gave up) until
//! the log has a leader and both other nodes are current replicas. The replica faults
//! and the full store stay as they are (`max_bytes` is lowered on the R3 stream alike).
//! Not injected: the meta leader's step-down (`$JS.API.META.LEADER.STEPDOWN` answers
//! only the system account, and deploy/accounts.conf has no system user, on purpose;
//! the meta leader moves when its node is the one killed or stalled), and the whole
//! cluster killed at once.
//!
//! With `--alarms` (`make chaos ALARMS=1`) it runs the alarm-loader scenario instead:
//! alarm-loaders, alarms and cron jobs under the loaders' faults and the server's,
//! checked from the log and the alarms' histories (`chaos/alarms.rs` says how).
//!
//! At the end it reads every process's chain (the rule of schemas/chain.md) and checks,
//! from the log alone:
//! 1. no foreign message and no loss on any subject; slots `0..n` in order, none twice,
//!    no gap; every entry carries the token of a request sent to that process;
//! 2. a request (one token: its retries and its twin included) is in the log at most
//!    once, and a message id at most once per process;
//! 3. a request answered with a receipt is in the log exactly once, and every receipt
//!    is what the log holds: slot, message id, timestamp, headers, body hash, previous
//!    and chain hash, and its run's `prev_seq`, first slot, count and seal; each
//!    receipt also checks alone (`Receipt::check` with the body), and at most one
//!    receipt of a request says `duplicate: false`. An `aggressive` receipt
//!    (`durable: false`) is a promise, not a fact (ARCHITECTURE.md): one the log does
//!    not keep is counted, not a violation;
//! 4. a request whose every answer was a definite refusal (any code but `unavailable`;
//!    or "no responders": no scheduler took it) is not in the log; an answer of
//!    unknown fate (`unavailable`, a timeout, a client error) lets it be there, once;
//! 5. a request within the limits is never refused `too_large`; one past a limit is;
//! 6. every request is answered (receipt or typed refusal) within the client timeout,
//!    except around faults that lose requests in flight by nature: nats-server or a
//!    node stalled or killed (the log's leader included: the clients and replicas
//!    connected to that node lose what was on their connection), a replica killed with
//!    SIGKILL (from one client timeout before the fault to 10 s after its recovery). A
//!    replica stopped with SIGTERM (also the skew and flag restarts) drains, a full
//!    store answers `log_full`, and a leader's step-down touches no connection:
//!    requests and answers travel on core NATS, and what the step-down does to the
//!    scheduler's writes (refused or unanswered publishes, retried) it must absorb
//!    within its write deadline (30 s, then `unavailable`), below the client's 45 s.
//!    There an unanswered request is a violation;
//! 7. a replica exits only when told to, within 20 s of SIGTERM, and every replica
//!    answers PING within 20 s of each fault's recovery;
//! 8. `turnstile verify --all --json` exits 0 and counts the same assignments.
//!
//! It prints a summary and writes JSON (`--out`); on a violation it prints the seed,
//! the fault timeline and the first violations, copies the replicas' and the servers'
//! logs to `bench-results/chaos-<seed>/`, and exits 1 (2: the harness itself failed).
//! `--seed` replays the same workload and fault schedule (what a fault hits depends on
//! timing too, so a replay is close, not identical).

#[path = "chaos/alarms.rs"]
mod alarms;
#[path = "chaos/workers.rs"]
mod workers;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use harness::{NatsCluster, NatsServer, Role, Urls as _};
use journal::client::{Client, Schedule};
use journal::subjects::Subjects;
use protocol::seal::Seal;
use protocol::wire::{ErrorCode, Mode, Receipt};
use protocol::{Hash32, ProcessId};
use tests::support::{
    connect, job_results, key_file, loader_command, published_keys, scheduler_command, test_key,
    wait_for_schedulers, wait_for_service, worker_command,
};

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Fault injection: scheduler replicas under a seeded workload and seeded faults, checked from the log"
)]
struct Args {
    /// Seconds of workload and faults (reading and checking the log come after).
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Seed of the workload and the fault schedule [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Scheduler replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Processes of the steady workload (the many-process events add new ones).
    #[arg(long, default_value_t = 300)]
    processes: usize,
    /// Steady clients (each sends one request at a time).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds a client waits for an answer.
    #[arg(long, default_value_t = 45)]
    timeout: u64,
    /// Scales the events (burst, twins, many-process and big-body sizes, requests in
    /// flight during overload): below 1 for slow (debug) builds.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Inject no fault (the same workload, as a baseline).
    #[arg(long)]
    no_faults: bool,
    /// Run against a 3-node JetStream cluster (deploy/nats-cluster.conf: the log and
    /// the buckets R3) instead of one nats-server, with the cluster's faults (node
    /// stalls and kills, leader kills and step-downs).
    #[arg(long)]
    cluster: bool,
    /// Inject only these fault kinds (comma-separated, e.g. `leader_stepdown,leader_kill`)
    /// [default: every kind of the mode].
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// The alarm-loader scenario (`make chaos ALARMS=1`, module `alarms`): alarm-loaders
    /// under seeded alarms, cron jobs and faults (loader kills, stops and skewed clocks,
    /// the server's stalls and kills), checked from the log and the alarms' histories;
    /// the schedulers take only the firings.
    #[arg(long)]
    alarms: bool,
    /// The worker scenario (`make chaos WORKERS=1`, module `workers`): a worker group
    /// of real instances running seeded jobs (some failing, some long) while instances
    /// are killed, stopped, added and removed and the server stalls and restarts;
    /// queues paused and jobs cancelled meanwhile; checked from the log, the jobs'
    /// results and what the handler saw.
    #[arg(long, conflicts_with = "alarms")]
    workers: bool,
    /// Worker instances (with `--workers`; a scale-out fault adds one more for a while).
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// Alarm-loaders (with `--alarms`).
    #[arg(long, default_value_t = 3)]
    loaders: usize,
    /// Seconds after the workload for what fell due to fire (with `--alarms`), or for
    /// every job to end (with `--workers`).
    #[arg(long, default_value_t = 60)]
    settle: u64,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/chaos.json")]
    out: PathBuf,
}

/// The header every request carries its token in (and that the log stores).
const TOKEN_HEADER: &str = "Chaos-Token";
/// A request with an id is retried only while its first attempt is younger than this
/// (the shortest dedupe window the faults use is 120 s, the largest skew 20 s).
const RETRY_SPAN_MS: u64 = 40_000;
/// Requests in flight during an overload phase.
const OVERLOAD_IN_FLIGHT: usize = 2_000;
/// How long `turnstile verify --all` may take.
const VERIFY_TIMEOUT_SECS: u64 = 300;
/// And one more second for every this many assignments (an hour's log of 1.4 million
/// assignments in 30,000 processes took longer than 300 s on a loaded machine).
const VERIFY_ASSIGNMENTS_PER_EXTRA_SEC: u64 = 2_000;
/// Client connections the workload spreads over.
const CONNECTIONS: usize = 4;
/// After a fault that loses requests in flight, how long unanswered requests are
/// still put down to it.
const FAULT_GRACE_MS: u64 = 10_000;
/// RNG streams: steady worker `w` uses `w`; event `i` uses `EVENTS + 1 + i`.
const STREAM_EVENTS: u64 = 1 << 20;
const STREAM_FAULTS: u64 = 1 << 21;

static T0: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since the harness started.
fn now_ms() -> u64 {
    T0.get_or_init(Instant::now).elapsed().as_millis() as u64
}

fn secs(ms: u64) -> String {
    format!("{:.1}", ms as f64 / 1000.0)
}

fn sleep_until(ms: u64) {
    let now = now_ms();
    if ms > now {
        std::thread::sleep(Duration::from_millis(ms - now));
    }
}

// ---------------------------------------------------------------------------------
// Workload

/// The scheduler's limits, from `$SRV.INFO` metadata.
#[derive(Debug, Clone, Copy, Serialize)]
struct Limits {
    max_body: usize,
    max_request_bytes: usize,
    max_message_id: usize,
}

impl Limits {
    async fn fetch(nats: &async_nats::Client) -> Result<Limits> {
        let reply = nats
            .request("$SRV.INFO.turnstile-scheduler", Bytes::new())
            .await?;
        let info: serde_json::Value = serde_json::from_slice(&reply.payload)?;
        let get = |name: &str| -> Result<usize> {
            info["metadata"][name]
                .as_str()
                .with_context(|| format!("{name} missing from $SRV.INFO metadata"))?
                .parse()
                .with_context(|| format!("{name} in $SRV.INFO metadata"))
        };
        Ok(Limits {
            max_body: get("max_body")?,
            max_request_bytes: get("max_request_bytes")?,
            max_message_id: get("max_message_id")?,
        })
    }

    /// The largest body a request with `id` (and the token header) may carry.
    fn max_body_for(&self, id: Option<&str>) -> usize {
        let fixed = TOKEN_HEADER.len() + 16 + id.map_or(0, str::len);
        self.max_body
            .min(self.max_request_bytes.saturating_sub(fixed))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Steady,
    Burst,
    Overload,
    Bytes,
    Twins,
    Big,
    Many,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Steady => "steady",
            Kind::Burst => "burst",
            Kind::Overload => "overload",
            Kind::Bytes => "bytes",
            Kind::Twins => "twins",
            Kind::Big => "big",
            Kind::Many => "many",
        }
    }
}

/// One logical request: its retries and its twin send exactly this again.
#[derive(Debug, Clone)]
struct Spec {
    token: u64,
    process: ProcessId,
    id: Option<String>,
    aggressive: bool,
    body_len: usize,
    /// One byte past the limit: must be refused `too_large`.
    over_limit: bool,
    kind: Kind,
}

impl Spec {
    fn token_hex(&self) -> String {
        format!("{:016x}", self.token)
    }

    fn body(&self) -> Bytes {
        let mut b = format!("chaos {} ", self.token_hex()).into_bytes();
        b.resize(self.body_len, b'.');
        Bytes::from(b)
    }

    fn options(&self) -> Schedule {
        Schedule {
            message_id: self.id.clone(),
            mode: self.aggressive.then_some(Mode::Aggressive),
            headers: vec![(TOKEN_HEADER.to_string(), self.token_hex())],
        }
    }
}

/// A seeded generator of requests (one per RNG stream).
struct Gen {
    rng: ChaCha8Rng,
    stream: u64,
    next: u64,
    limits: Limits,
    processes: usize,
}

impl Gen {
    fn new(seed: u64, stream: u64, limits: Limits, processes: usize) -> Gen {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Gen {
            rng,
            stream,
            next: 0,
            limits,
            processes: processes.max(1),
        }
    }

    fn token(&mut self) -> u64 {
        self.next += 1;
        (self.stream << 32) | self.next
    }

    /// A process of the steady set: half the time one of the ten hot ones.
    fn process(&mut self) -> Result<ProcessId> {
        let n = if self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..self.processes.min(10))
        } else {
            self.rng.gen_range(0..self.processes)
        };
        Ok(ProcessId::new(format!("c-{n}"))?)
    }

    /// A message id: mostly short, a fifth of them up to the longest allowed.
    fn id(&mut self, token: u64) -> String {
        let base = format!("id-{token:016x}");
        let max = self.limits.max_message_id.max(base.len());
        if self.rng.gen_bool(0.2) {
            let len = self.rng.gen_range(base.len()..=max);
            format!("{base}{}", "x".repeat(len - base.len()))
        } else {
            base
        }
    }

    /// A body size: mostly small, a few large, some at the limit, rarely one past it.
    fn size(&mut self, id: Option<&str>) -> (usize, bool) {
        let max = self.limits.max_body_for(id).max(1024);
        let r: f64 = self.rng.gen();
        if r < 0.03 {
            (0, false)
        } else if r < 0.86 {
            (self.rng.gen_range(1..=512), false)
        } else if r < 0.975 {
            (self.rng.gen_range(513..=65_536.min(max)), false)
        } else if r < 0.995 {
            if self.rng.gen_bool(0.5) {
                (max, false)
            } else {
                (self.rng.gen_range(65_536.min(max)..=max), false)
            }
        } else {
            (max + 1, true)
        }
    }

    fn spec(&mut self, kind: Kind, process: ProcessId, id_share: f64, small: bool) -> Spec {
        let token = self.token();
        let id = self.rng.gen_bool(id_share).then(|| self.id(token));
        let (body_len, over_limit) = if small {
            (self.rng.gen_range(0..=256), false)
        } else {
            self.size(id.as_deref())
        };
        Spec {
            token,
            process,
            id,
            aggressive: self.rng.gen_bool(0.05),
            body_len,
            over_limit,
            kind,
        }
    }

    /// A request of exactly `len` bytes of body (`over`: past the limit).
    fn sized(&mut self, kind: Kind, process: ProcessId, at: SizeAt) -> Spec {
        let mut s = self.spec(kind, process, 0.5, true);
        s.aggressive = false;
        let max = self.limits.max_body_for(s.id.as_deref());
        (s.body_len, s.over_limit) = match at {
            SizeAt::Max => (max, false),
            SizeAt::Over => (max + 1, true),
            SizeAt::Near => (self.rng.gen_range(max / 2..=max), false),
        };
        s
    }
}

#[derive(Debug, Clone, Copy)]
enum SizeAt {
    Max,
    Over,
    Near,
}

/// What one attempt got.
#[derive(Debug)]
enum Answer {
    /// A receipt (checked alone after the run: [`receipts_check_alone`]).
    Receipt(Box<Receipt>),
    Refused(ErrorCode, String),
    Timeout,
    NoResponders,
    Failed(String),
}

impl Answer {
    /// Worth sending again with the same id.
    fn retry(&self) -> bool {
        match self {
            Answer::Receipt(..) => false,
            Answer::Refused(code, _) => matches!(
                code,
                ErrorCode::Unavailable | ErrorCode::Busy | ErrorCode::LogFull
            ),
            Answer::Timeout | Answer::NoResponders | Answer::Failed(_) => true,
        }
    }

    /// Whether the attempt may have been written: a receipt, or an answer of unknown
    /// fate. A definite refusal and "no responders" (nobody took it) were not.
    fn may_be_written(&self) -> bool {
        match self {
            Answer::Receipt(..) | Answer::Timeout | Answer::Failed(_) => true,
            Answer::Refused(code, _) => *code == ErrorCode::Unavailable,
            Answer::NoResponders => false,
        }
    }

    fn unanswered(&self) -> bool {
        matches!(
            self,
            Answer::Timeout | Answer::NoResponders | Answer::Failed(_)
        )
    }

    fn label(&self) -> String {
        match self {
            Answer::Receipt(r) if r.duplicate => "receipt (duplicate)".into(),
            Answer::Receipt(..) => "receipt".into(),
            Answer::Refused(code, m) => format!("{} ({m})", code.as_str()),
            Answer::Timeout => "timeout".into(),
            Answer::NoResponders => "no responders".into(),
            Answer::Failed(e) => format!("client error: {e}"),
        }
    }
}

#[derive(Debug)]
struct Attempt {
    sent_ms: u64,
    answered_ms: u64,
    answer: Answer,
}

#[derive(Debug)]
struct Record {
    spec: Spec,
    attempts: Vec<Attempt>,
}

async fn attempt(client: &Client, spec: &Spec, body: &Bytes, opts: &Schedule) -> Attempt {
    let sent_ms = now_ms();
    let answer = match client.schedule(&spec.process, body.clone(), opts).await {
        Ok(r) => Answer::Receipt(Box::new(r)),
        Err(journal::Error::Refused { code, message }) => Answer::Refused(code, message),
        Err(journal::Error::Timeout(_)) => Answer::Timeout,
        Err(journal::Error::NoResponders(_)) => Answer::NoResponders,
        Err(e) => Answer::Failed(e.to_string()),
    };
    Attempt {
        sent_ms,
        answered_ms: now_ms(),
        answer,
    }
}

/// Sends `spec`; with an id, again (same id, same body) while the answer says so and
/// the first attempt is younger than [`RETRY_SPAN_MS`].
async fn send(client: &Client, spec: &Spec) -> Vec<Attempt> {
    let body = spec.body();
    let opts = spec.options();
    let first = now_ms();
    let mut attempts = Vec::new();
    loop {
        let a = attempt(client, spec, &body, &opts).await;
        let again = spec.id.is_some() && a.answer.retry();
        attempts.push(a);
        if !again || now_ms().saturating_sub(first) > RETRY_SPAN_MS || attempts.len() >= 30 {
            return attempts;
        }
        let pause = 200 * attempts.len().min(10) as u64;
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// What the workload shares.
struct Ctx {
    clients: Vec<Client>,
    records: Mutex<Vec<Record>>,
    tracker: TaskTracker,
    next_client: AtomicUsize,
    stop_ms: u64,
    seed: u64,
    limits: Limits,
    processes: usize,
    scale: f64,
}

impl Ctx {
    fn client(&self) -> &Client {
        let i = self.next_client.fetch_add(1, Ordering::Relaxed);
        &self.clients[i % self.clients.len()]
    }

    fn record(&self, spec: Spec, attempts: Vec<Attempt>) {
        if let Ok(mut r) = self.records.lock() {
            r.push(Record { spec, attempts });
        }
    }

    /// Sends `spec` in a task of its own.
    fn spawn(self: &Arc<Self>, spec: Spec) {
        let ctx = Arc::clone(self);
        self.tracker.spawn(async move {
            let attempts = send(ctx.client(), &spec).await;
            ctx.record(spec, attempts);
        });
    }

    /// Sends `spec` twice at once, on two connections.
    fn spawn_twins(self: &Arc<Self>, spec: Spec) {
        let ctx = Arc::clone(self);
        self.tracker.spawn(async move {
            let (a, b) = (ctx.client(), ctx.client());
            let (mut x, y) = tokio::join!(send(a, &spec), send(b, &spec));
            x.extend(y);
            ctx.record(spec, x);
        });
    }
}

/// A steady client: one request at a time, a short random pause between.
async fn steady(ctx: Arc<Ctx>, worker: u64) -> Result<()> {
    let mut g = Gen::new(ctx.seed, worker, ctx.limits, ctx.processes);
    while now_ms() < ctx.stop_ms {
        let p = g.process()?;
        let spec = g.spec(Kind::Steady, p, 0.5, false);
        let attempts = send(ctx.client(), &spec).await;
        ctx.record(spec, attempts);
        let think = g.rng.gen_range(0..20);
        tokio::time::sleep(Duration::from_millis(think)).await;
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
struct Event {
    at_ms: u64,
    kind: Kind,
    /// Requests (pairs for twins; milliseconds for overload).
    n: usize,
}

fn plan_events(seed: u64, duration_ms: u64, scale: f64) -> Vec<Event> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(STREAM_EVENTS);
    let mut out = Vec::new();
    let mut at = 3_000;
    while at + 5_000 < duration_ms {
        let kind = *[
            (Kind::Burst, 30),
            (Kind::Twins, 20),
            (Kind::Many, 15),
            (Kind::Overload, 15),
            (Kind::Big, 10),
            (Kind::Bytes, 10),
        ]
        .choose_weighted(&mut rng, |k| k.1)
        .map(|k| &k.0)
        .unwrap_or(&Kind::Burst);
        let n = match kind {
            Kind::Burst => rng.gen_range(200..=800),
            Kind::Twins => rng.gen_range(50..=200),
            Kind::Many => rng.gen_range(100..=500),
            Kind::Overload => rng.gen_range(2_000..=4_000),
            Kind::Big => rng.gen_range(3..=8),
            Kind::Bytes => rng.gen_range(40..=120),
            Kind::Steady => 0,
        };
        let n = match kind {
            Kind::Overload => n,
            _ => ((n as f64 * scale).round() as usize).max(1),
        };
        out.push(Event { at_ms: at, kind, n });
        at += rng.gen_range(3_000..=8_000);
    }
    out
}

async fn run_events(ctx: Arc<Ctx>, events: Vec<Event>) -> Result<()> {
    for (i, ev) in events.into_iter().enumerate() {
        let wait = ev.at_ms.saturating_sub(now_ms());
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if now_ms() >= ctx.stop_ms {
            break;
        }
        let mut g = Gen::new(
            ctx.seed,
            STREAM_EVENTS + 1 + i as u64,
            ctx.limits,
            ctx.processes,
        );
        match ev.kind {
            Kind::Burst => {
                let p = g.process()?;
                let share = if g.rng.gen_bool(0.5) { 1.0 } else { 0.5 };
                for _ in 0..ev.n {
                    let s = g.spec(Kind::Burst, p.clone(), share, true);
                    ctx.spawn(s);
                }
            }
            Kind::Twins => {
                let p = g.process()?;
                for _ in 0..ev.n {
                    let s = g.spec(Kind::Twins, p.clone(), 1.0, true);
                    ctx.spawn_twins(s);
                }
            }
            Kind::Many => {
                for j in 0..ev.n {
                    let p = ProcessId::new(format!("m{i}-{j}"))?;
                    let s = g.spec(Kind::Many, p, 0.5, true);
                    ctx.spawn(s);
                }
            }
            Kind::Overload => {
                let in_flight = (OVERLOAD_IN_FLIGHT as f64 * ctx.scale).max(1.0) as usize;
                let permits = Arc::new(Semaphore::new(in_flight));
                let end = now_ms() + ev.n as u64;
                while now_ms() < end {
                    let permit = Arc::clone(&permits).acquire_owned().await?;
                    let p = ProcessId::new(format!("c-{}", g.rng.gen_range(0..ctx.processes)))?;
                    let s = g.spec(Kind::Overload, p, 0.3, true);
                    let c = Arc::clone(&ctx);
                    ctx.tracker.spawn(async move {
                        let attempts = send(c.client(), &s).await;
                        c.record(s, attempts);
                        drop(permit);
                    });
                }
            }
            Kind::Big => {
                let p = g.process()?;
                for k in 0..ev.n {
                    let at = if k % 3 == 2 {
                        SizeAt::Over
                    } else {
                        SizeAt::Max
                    };
                    let s = g.sized(Kind::Big, p.clone(), at);
                    ctx.spawn(s);
                }
            }
            Kind::Bytes => {
                let p = g.process()?;
                for _ in 0..ev.n {
                    let s = g.sized(Kind::Bytes, p.clone(), SizeAt::Near);
                    ctx.spawn(s);
                }
            }
            Kind::Steady => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Faults

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Fault {
    NatsStall {
        ms: u64,
    },
    NatsKill {
        down_ms: u64,
    },
    ReplicaKill {
        replica: usize,
        down_ms: u64,
    },
    ReplicaTerm {
        replica: usize,
    },
    ClockSkew {
        replica: usize,
        skew_ms: i64,
        hold_ms: u64,
    },
    Flags {
        replica: usize,
        flags: Vec<String>,
        hold_ms: u64,
    },
    FullStore {
        hold_ms: u64,
    },
    /// An alarm-loader killed (SIGKILL), restarted after `down_ms`.
    LoaderKill {
        loader: usize,
        down_ms: u64,
    },
    /// An alarm-loader stopped (SIGTERM), restarted.
    LoaderTerm {
        loader: usize,
    },
    /// An alarm-loader restarted with its clock skewed (`--clock-skew-ms`) for a while.
    LoaderSkew {
        loader: usize,
        skew_ms: i64,
        hold_ms: u64,
    },
    /// A worker instance killed (SIGKILL, its jobs' children with it), restarted after
    /// `down_ms`.
    WorkerKill {
        worker: usize,
        down_ms: u64,
    },
    /// A worker instance stopped (SIGTERM: it hands back what waits, drains what
    /// runs), restarted.
    WorkerTerm {
        worker: usize,
    },
    /// One more worker instance started, serving `hold_ms`, then stopped (SIGTERM).
    WorkerScale {
        hold_ms: u64,
    },
    /// The worker instance that feeds the group killed (SIGKILL), restarted after
    /// `down_ms` (another one takes the feed lease meanwhile).
    FeederKill {
        down_ms: u64,
    },
    /// Cluster: a node stopped (SIGSTOP) for `ms`, then continued.
    NodeStall {
        node: Node,
        ms: u64,
    },
    /// Cluster: a node that does not lead the log killed (SIGKILL), restarted in place.
    NodeKill {
        follower: usize,
        down_ms: u64,
    },
    /// Cluster: the node that leads the log killed (SIGKILL), restarted in place.
    LeaderKill {
        down_ms: u64,
    },
    /// Cluster: the leader of `stream` asked to step down
    /// (`$JS.API.STREAM.LEADER.STEPDOWN.<stream>`, as the operator).
    LeaderStepdown {
        stream: String,
    },
}

/// Which node of the cluster a fault hits, resolved when it starts.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
enum Node {
    /// The node that leads the log stream.
    Leader,
    /// One of the nodes that do not (this one, modulo their number).
    Follower(usize),
}

impl Fault {
    /// The kinds against one nats-server.
    const KINDS: [&'static str; 7] = [
        "nats_stall",
        "nats_kill",
        "replica_kill",
        "replica_term",
        "clock_skew",
        "flags",
        "full_store",
    ];
    /// The kinds against a cluster: the server's stall and kill become a node's (any,
    /// or the log's leader), plus leader changes; the rest as against one server.
    const CLUSTER_KINDS: [&'static str; 9] = [
        "node_stall",
        "node_kill",
        "leader_kill",
        "leader_stepdown",
        "replica_kill",
        "replica_term",
        "clock_skew",
        "flags",
        "full_store",
    ];

    /// The kinds of the alarm-loader scenario against one nats-server.
    const ALARM_KINDS: [&'static str; 5] = [
        "loader_kill",
        "loader_term",
        "loader_skew",
        "nats_stall",
        "nats_kill",
    ];
    /// The kinds of the alarm-loader scenario against a cluster.
    const ALARM_CLUSTER_KINDS: [&'static str; 7] = [
        "loader_kill",
        "loader_term",
        "loader_skew",
        "node_stall",
        "node_kill",
        "leader_kill",
        "leader_stepdown",
    ];

    /// The kinds of the worker scenario (one nats-server only).
    const WORKER_KINDS: [&'static str; 6] = [
        "worker_kill",
        "worker_term",
        "worker_scale",
        "feeder_kill",
        "nats_stall",
        "nats_kill",
    ];

    fn name(&self) -> &'static str {
        match self {
            Fault::WorkerKill { .. } => "worker_kill",
            Fault::WorkerTerm { .. } => "worker_term",
            Fault::WorkerScale { .. } => "worker_scale",
            Fault::FeederKill { .. } => "feeder_kill",
            Fault::NatsStall { .. } => "nats_stall",
            Fault::NatsKill { .. } => "nats_kill",
            Fault::ReplicaKill { .. } => "replica_kill",
            Fault::ReplicaTerm { .. } => "replica_term",
            Fault::ClockSkew { .. } => "clock_skew",
            Fault::Flags { .. } => "flags",
            Fault::FullStore { .. } => "full_store",
            Fault::LoaderKill { .. } => "loader_kill",
            Fault::LoaderTerm { .. } => "loader_term",
            Fault::LoaderSkew { .. } => "loader_skew",
            Fault::NodeStall { .. } => "node_stall",
            Fault::NodeKill { .. } => "node_kill",
            Fault::LeaderKill { .. } => "leader_kill",
            Fault::LeaderStepdown { .. } => "leader_stepdown",
        }
    }

    /// Faults that lose requests in flight by their nature: a request on a stopped or
    /// killed server or node (the client's or the replica's connection is there), or
    /// inside a killed replica, gets no answer. A step-down is not one of them: the
    /// requests and answers travel on core NATS, which a stream's leader change does
    /// not touch, and the scheduler answers within its write deadline (30 s) whatever
    /// its writes meet, so an unanswered request around a step-down is a violation.
    fn loses_in_flight(&self) -> bool {
        matches!(
            self,
            Fault::NatsStall { .. }
                | Fault::NatsKill { .. }
                | Fault::ReplicaKill { .. }
                | Fault::NodeStall { .. }
                | Fault::NodeKill { .. }
                | Fault::LeaderKill { .. }
        )
    }

    fn describe(&self) -> String {
        match self {
            Fault::NatsStall { ms } => format!("nats-server stalled (SIGSTOP) {} s", secs(*ms)),
            Fault::NatsKill { down_ms } => {
                format!(
                    "nats-server SIGKILL, down {} s, restarted in place",
                    secs(*down_ms)
                )
            }
            Fault::ReplicaKill { replica, down_ms } => {
                format!("replica {replica} SIGKILL, down {} s", secs(*down_ms))
            }
            Fault::ReplicaTerm { replica } => format!("replica {replica} SIGTERM, restarted"),
            Fault::ClockSkew {
                replica,
                skew_ms,
                hold_ms,
            } => format!(
                "replica {replica} restarted with --clock-skew-ms {skew_ms} for {} s",
                secs(*hold_ms)
            ),
            Fault::Flags {
                replica,
                flags,
                hold_ms,
            } => format!(
                "replica {replica} restarted with {} for {} s",
                flags.join(" "),
                secs(*hold_ms)
            ),
            Fault::FullStore { hold_ms } => {
                format!("log stream max_bytes = its size for {} s", secs(*hold_ms))
            }
            Fault::LoaderKill { loader, down_ms } => {
                format!("loader {loader} SIGKILL, down {} s", secs(*down_ms))
            }
            Fault::LoaderTerm { loader } => format!("loader {loader} SIGTERM, restarted"),
            Fault::LoaderSkew {
                loader,
                skew_ms,
                hold_ms,
            } => format!(
                "loader {loader} restarted with --clock-skew-ms {skew_ms} for {} s",
                secs(*hold_ms)
            ),
            Fault::WorkerKill { worker, down_ms } => {
                format!("worker {worker} SIGKILL, down {} s", secs(*down_ms))
            }
            Fault::WorkerTerm { worker } => format!("worker {worker} SIGTERM, restarted"),
            Fault::WorkerScale { hold_ms } => format!(
                "one more worker instance for {} s, then SIGTERM",
                secs(*hold_ms)
            ),
            Fault::FeederKill { down_ms } => {
                format!("the feeding worker SIGKILL, down {} s", secs(*down_ms))
            }
            Fault::NodeStall { node, ms } => format!(
                "{} stalled (SIGSTOP) {} s",
                match node {
                    Node::Leader => "the log's leader node",
                    Node::Follower(_) => "a follower node",
                },
                secs(*ms)
            ),
            Fault::NodeKill { down_ms, .. } => format!(
                "a follower node SIGKILL, down {} s, restarted in place",
                secs(*down_ms)
            ),
            Fault::LeaderKill { down_ms } => format!(
                "the log's leader node SIGKILL, down {} s, restarted in place",
                secs(*down_ms)
            ),
            Fault::LeaderStepdown { stream } => format!("the leader of {stream} steps down"),
        }
    }
}

/// Which scenario a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Scheduler,
    Alarms,
    Workers,
}

impl Scenario {
    fn of(args: &Args) -> Scenario {
        if args.alarms {
            Scenario::Alarms
        } else if args.workers {
            Scenario::Workers
        } else {
            Scenario::Scheduler
        }
    }
}

/// The kinds a run injects: `only` (each a kind of the mode), or every kind of the mode.
fn fault_kinds(cluster: bool, scenario: Scenario, only: &[String]) -> Result<Vec<&'static str>> {
    let all: &[&'static str] = match (cluster, scenario) {
        (true, Scenario::Scheduler) => &Fault::CLUSTER_KINDS,
        (false, Scenario::Scheduler) => &Fault::KINDS,
        (true, Scenario::Alarms) => &Fault::ALARM_CLUSTER_KINDS,
        (false, Scenario::Alarms) => &Fault::ALARM_KINDS,
        (true, Scenario::Workers) => bail!(
            "--workers --cluster is not built: the worker scenario runs against one nats-server \
             (the cluster's faults are exercised by the scheduler and alarm scenarios)"
        ),
        (false, Scenario::Workers) => &Fault::WORKER_KINDS,
    };
    if only.is_empty() {
        return Ok(all.to_vec());
    }
    only.iter()
        .map(|k| {
            all.iter()
                .find(|a| **a == k.as_str())
                .copied()
                .with_context(|| {
                    format!(
                        "--faults: no fault {k:?} {}{}; there are {}",
                        if cluster {
                            "with --cluster"
                        } else {
                            "without --cluster"
                        },
                        match scenario {
                            Scenario::Scheduler => "",
                            Scenario::Alarms => " and --alarms",
                            Scenario::Workers => " and --workers",
                        },
                        all.join(", ")
                    )
                })
        })
        .collect()
}

/// The fault schedule: every kind of `kinds` once in a seeded order, again and again,
/// each with the pause after it.
fn plan_faults(
    seed: u64,
    replicas: usize,
    loaders: usize,
    workers: usize,
    kinds: &[&'static str],
) -> Vec<(Fault, u64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(STREAM_FAULTS);
    let flag_sets: [[&str; 2]; 7] = [
        ["--max-run-entries", "1"],
        ["--max-run-entries", "7"],
        ["--max-run-entries", "5000"],
        ["--dedupe-window-secs", "120"],
        ["--dedupe-window-secs", "3600"],
        ["--singles-in-flight", "1"],
        ["--singles-in-flight", "4"],
    ];
    let subjects = Subjects::default();
    // The log's leader most of the time; the buckets' (settings and keys, which every
    // replica watches) now and then.
    let stepdown_streams = [
        subjects.log_stream(),
        subjects.log_stream(),
        format!("KV_{}", subjects.processes_bucket()),
        format!("KV_{}", subjects.keys_bucket()),
    ];
    let mut out = Vec::new();
    while out.len() < 700 {
        let mut round = kinds.to_vec();
        round.shuffle(&mut rng);
        for kind in round {
            let replica = rng.gen_range(0..replicas.max(1));
            let fault = match kind {
                "nats_stall" => Fault::NatsStall {
                    ms: rng.gen_range(2_000..=10_000),
                },
                "nats_kill" => Fault::NatsKill {
                    down_ms: rng.gen_range(0..=3_000),
                },
                "replica_kill" => Fault::ReplicaKill {
                    replica,
                    down_ms: rng.gen_range(0..=3_000),
                },
                "replica_term" => Fault::ReplicaTerm { replica },
                "worker_kill" => Fault::WorkerKill {
                    worker: rng.gen_range(0..workers.max(1)),
                    down_ms: rng.gen_range(0..=3_000),
                },
                "worker_term" => Fault::WorkerTerm {
                    worker: rng.gen_range(0..workers.max(1)),
                },
                "worker_scale" => Fault::WorkerScale {
                    hold_ms: rng.gen_range(6_000..=15_000),
                },
                "feeder_kill" => Fault::FeederKill {
                    down_ms: rng.gen_range(0..=3_000),
                },
                "loader_kill" => Fault::LoaderKill {
                    loader: rng.gen_range(0..loaders.max(1)),
                    down_ms: rng.gen_range(0..=3_000),
                },
                "loader_term" => Fault::LoaderTerm {
                    loader: rng.gen_range(0..loaders.max(1)),
                },
                "loader_skew" => {
                    let skew: i64 = rng.gen_range(2_000..=8_000);
                    Fault::LoaderSkew {
                        loader: rng.gen_range(0..loaders.max(1)),
                        skew_ms: if rng.gen_bool(0.5) { skew } else { -skew },
                        hold_ms: rng.gen_range(8_000..=20_000),
                    }
                }
                "clock_skew" => {
                    let skew: i64 = rng.gen_range(1_000..=20_000);
                    Fault::ClockSkew {
                        replica,
                        skew_ms: if rng.gen_bool(0.5) { skew } else { -skew },
                        hold_ms: rng.gen_range(8_000..=20_000),
                    }
                }
                "flags" => Fault::Flags {
                    replica,
                    flags: flag_sets[rng.gen_range(0..flag_sets.len())]
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    hold_ms: rng.gen_range(8_000..=20_000),
                },
                "node_stall" => Fault::NodeStall {
                    node: if rng.gen_bool(0.5) {
                        Node::Leader
                    } else {
                        Node::Follower(rng.gen_range(0..2))
                    },
                    ms: rng.gen_range(2_000..=10_000),
                },
                "node_kill" => Fault::NodeKill {
                    follower: rng.gen_range(0..2),
                    down_ms: rng.gen_range(0..=5_000),
                },
                "leader_kill" => Fault::LeaderKill {
                    down_ms: rng.gen_range(1_000..=8_000),
                },
                "leader_stepdown" => Fault::LeaderStepdown {
                    stream: stepdown_streams[rng.gen_range(0..stepdown_streams.len())].clone(),
                },
                _ => Fault::FullStore {
                    hold_ms: rng.gen_range(3_000..=6_000),
                },
            };
            out.push((fault, rng.gen_range(3_000..=8_000)));
        }
    }
    out
}

#[derive(Debug, Clone, Serialize)]
struct FaultRecord {
    #[serde(flatten)]
    fault: Fault,
    start_ms: u64,
    end_ms: u64,
    notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Violation {
    rule: &'static str,
    detail: String,
}

fn violation(rule: &'static str, detail: impl Into<String>) -> Violation {
    Violation {
        rule,
        detail: detail.into(),
    }
}

/// A scheduler replica or an alarm-loader: the process, its log, how often it started.
struct Replica {
    /// A scheduler's key (none for a loader).
    key: Option<PathBuf>,
    process: Option<harness::Process>,
    log: PathBuf,
    starts: usize,
}

/// What the replicas run against: one nats-server, or a 3-node cluster.
enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl harness::Urls for Nats {
    fn url_as(&self, role: Role) -> String {
        match self {
            Nats::Single(s) => s.url_as(role),
            Nats::Cluster(c) => c.url_as(role),
        }
    }
}

impl Nats {
    /// The anonymous client's URL (every node's, comma-separated, for a cluster).
    fn url(&self) -> String {
        match self {
            Nats::Single(s) => s.url().to_string(),
            Nats::Cluster(c) => c.url(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Nats::Single(s) => format!("nats-server {}", s.url()),
            Nats::Cluster(c) => format!("a {}-node cluster {}", c.len(), c.url()),
        }
    }

    /// The flags every replica runs with, as deploy/ says for this deployment: on a
    /// cluster, the log and the buckets R3, and 16 singles in flight (every write is
    /// an fsync under the cluster's `sync_interval: always`).
    fn scheduler_flags(&self) -> Vec<String> {
        match self {
            Nats::Single(_) => Vec::new(),
            Nats::Cluster(_) => ["--replicas", "3", "--singles-in-flight", "16"]
                .map(String::from)
                .to_vec(),
        }
    }

    /// The flags every alarm-loader runs with: on a cluster, its stream and the
    /// ownership bucket R3.
    fn loader_flags(&self) -> Vec<String> {
        match self {
            Nats::Single(_) => Vec::new(),
            Nats::Cluster(_) => ["--replicas", "3"].map(String::from).to_vec(),
        }
    }

    /// The servers' logs, each with the name it is kept under.
    fn logs(&self) -> Vec<(String, PathBuf)> {
        match self {
            Nats::Single(s) => vec![("nats.log".to_string(), s.log_path())],
            Nats::Cluster(c) => (0..c.len())
                .map(|i| (format!("nats-{}.log", c.name(i)), c.node(i).log_path()))
                .collect(),
        }
    }
}

/// `base` flags with those of `extra` in place of the same options of `base` (the
/// scheduler refuses an option given twice); both are `--option value` pairs.
fn with_flags(base: &[String], extra: &[String]) -> Vec<String> {
    let mut out: Vec<String> = base
        .chunks(2)
        .filter(|pair| {
            pair.first()
                .is_none_or(|name| !extra.iter().step_by(2).any(|e| e == name))
        })
        .flatten()
        .cloned()
        .collect();
    out.extend_from_slice(extra);
    out
}

/// The info of `stream`, asked with a short timeout (a stalled leader answers nothing).
async fn stream_info(
    operator: &async_nats::Client,
    stream: &str,
) -> Result<async_nats::jetstream::stream::Info> {
    let mut js = async_nats::jetstream::new(operator.clone());
    js.set_timeout(Duration::from_secs(2));
    let s = js.get_stream(stream).await?;
    Ok(s.cached_info().clone())
}

/// The name of the node that leads `stream` now, if it has a leader and says so.
async fn leader_of(operator: &async_nats::Client, stream: &str) -> Option<String> {
    stream_info(operator, stream).await.ok()?.cluster?.leader
}

/// Waits (up to 60 s) until the log stream has a leader and every other node is a
/// current replica; says how it went. A cluster that does not settle is noted, not a
/// violation: the next fault then meets a cluster still recovering, which the
/// scheduler must survive as well.
async fn settle(operator: &async_nats::Client, nodes: usize) -> String {
    let stream = Subjects::default().log_stream();
    let started = Instant::now();
    let mut last = String::from("no answer");
    while started.elapsed() < Duration::from_secs(60) {
        match stream_info(operator, &stream).await {
            Ok(info) => {
                let cluster = info.cluster.unwrap_or_default();
                let current = cluster
                    .replicas
                    .iter()
                    .filter(|r| r.current && !r.offline)
                    .count();
                if let Some(leader) = &cluster.leader {
                    if current + 1 == nodes {
                        return format!(
                            "{stream} led by {leader}, every replica current after {} s",
                            secs(started.elapsed().as_millis() as u64)
                        );
                    }
                }
                last = format!(
                    "leader {:?}, {current} of {} replicas current",
                    cluster.leader,
                    nodes.saturating_sub(1)
                );
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    format!("{stream} not settled within 60 s: {last}")
}

/// Asks the leader of `stream` to step down; waits (up to 20 s) for another one.
async fn step_down(operator: &async_nats::Client, stream: &str) -> Result<Vec<String>> {
    let before = leader_of(operator, stream).await;
    let started = Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        operator.request(
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
            Bytes::new(),
        ),
    )
    .await
    .context("step-down request: no answer within 5 s")??;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    if answer["success"].as_bool() != Some(true) {
        return Ok(vec![format!(
            "{stream}: step-down refused: {} (leader {before:?})",
            answer["error"]
        )]);
    }
    while started.elapsed() < Duration::from_secs(20) {
        if let Some(now) = leader_of(operator, stream).await {
            if Some(&now) != before.as_ref() {
                return Ok(vec![format!(
                    "{stream}: leader {} -> {now} after {} s",
                    before.as_deref().unwrap_or("?"),
                    secs(started.elapsed().as_millis() as u64)
                )]);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(vec![format!(
        "{stream}: step-down accepted, but no other leader than {before:?} within 20 s"
    )])
}

/// Which service a member of the rig runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Svc {
    Scheduler,
    Loader,
    Worker,
}

impl Svc {
    fn name(self) -> &'static str {
        match self {
            Svc::Scheduler => "replica",
            Svc::Loader => "loader",
            Svc::Worker => "worker",
        }
    }
}

/// The servers, the replicas and the loaders, owned by the fault injector while it
/// runs.
struct Rig {
    nats: Nats,
    replicas: Vec<Replica>,
    /// Flags every replica starts with ([`Nats::scheduler_flags`]).
    flags: Vec<String>,
    /// The alarm-loaders (none unless `--alarms`).
    loaders: Vec<Replica>,
    /// Flags every loader starts with ([`Nats::loader_flags`]).
    loader_flags: Vec<String>,
    /// The worker instances (none unless `--workers`); the last one is the spare a
    /// scale-out fault starts for a while.
    workers: Vec<Replica>,
    /// How every worker instance starts.
    worker: Option<WorkerSpec>,
    /// Every worker instance the injector ended (SIGKILL or SIGTERM): its pid and when
    /// it was reaped (ms, [`now_ms`]). A handler's child dies with its instance (a
    /// parent-death signal), so this bounds the end of a run it cut.
    worker_exits: Vec<(u32, u64)>,
    /// A connection for PING (reconnects by itself after a server restart).
    ping: async_nats::Client,
    /// The operator's connection (every node's URL): leaders, step-downs.
    operator: async_nats::Client,
    violations: Vec<Violation>,
}

impl Rig {
    fn members(&mut self, svc: Svc) -> &mut Vec<Replica> {
        match svc {
            Svc::Scheduler => &mut self.replicas,
            Svc::Loader => &mut self.loaders,
            Svc::Worker => &mut self.workers,
        }
    }

    /// Starts member `r` of `svc` with its usual flags, `flags` in place of the same
    /// options.
    fn start(&mut self, svc: Svc, r: usize, flags: &[String]) -> Result<()> {
        let base = match svc {
            Svc::Scheduler => &self.flags,
            Svc::Loader => &self.loader_flags,
            Svc::Worker => {
                &self
                    .worker
                    .as_ref()
                    .context("a worker without a spec")?
                    .flags
            }
        };
        let flags = with_flags(base, flags);
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut cmd = match svc {
            Svc::Scheduler => {
                let key = self.replicas[r]
                    .key
                    .clone()
                    .context("a scheduler replica without a key")?;
                scheduler_command(&self.nats, &key, &args)?
            }
            Svc::Loader => loader_command(&self.nats, &args)?,
            Svc::Worker => {
                let spec = self.worker.as_ref().context("a worker without a spec")?;
                // Info: the worker says when it is ready and when it feeds the group.
                worker_command(&self.nats, &spec.group, &spec.script, &args, "info")?
            }
        };
        let rep = &mut self.members(svc)[r];
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&rep.log)?;
        writeln!(
            log,
            "=== chaos: {} {r} started at {} s with {flags:?}",
            svc.name(),
            secs(now_ms())
        )?;
        cmd.stderr(log);
        rep.process = Some(harness::Process::spawn(cmd)?);
        rep.starts += 1;
        Ok(())
    }

    /// SIGTERM; a member that does not exit within 20 s is a violation (then killed).
    fn stop(&mut self, svc: Svc, r: usize, notes: &mut Vec<String>) {
        let Some(mut p) = self.members(svc)[r].process.take() else {
            return;
        };
        let started = Instant::now();
        let what = svc.name();
        let pid = p.pid();
        let exited = p.terminate(Duration::from_secs(20));
        if let (Svc::Worker, Some(pid)) = (svc, pid) {
            self.worker_exits.push((pid, now_ms()));
        }
        if exited {
            notes.push(format!(
                "{what} {r} exited {:.1} s after SIGTERM",
                started.elapsed().as_secs_f64()
            ));
        } else {
            self.violations.push(violation(
                what,
                format!(
                    "{what} {r} did not exit within 20 s of SIGTERM at {} s (killed)",
                    secs(now_ms())
                ),
            ));
        }
    }

    /// SIGKILLs member `r` of `svc`, starts it again after `down_ms`.
    fn kill(&mut self, svc: Svc, r: usize, down_ms: u64) -> Result<()> {
        if let Some(mut p) = self.members(svc)[r].process.take() {
            let pid = p.pid();
            p.kill();
            if let (Svc::Worker, Some(pid)) = (svc, pid) {
                self.worker_exits.push((pid, now_ms()));
            }
        }
        std::thread::sleep(Duration::from_millis(down_ms));
        self.start(svc, r, &[])
    }

    /// A graceful stop of every replica, loader and worker, as at the end of any
    /// deployment.
    fn stop_all(&mut self) {
        for svc in [Svc::Worker, Svc::Scheduler, Svc::Loader] {
            for r in 0..self.members(svc).len() {
                let mut notes = Vec::new();
                self.stop(svc, r, &mut notes);
            }
        }
    }

    /// A server, node or replica that exited by itself is a violation; it is started
    /// again.
    fn check_alive(&mut self) -> Result<()> {
        let mut exited = Vec::new();
        match &mut self.nats {
            Nats::Single(server) => {
                if let Some(status) = server.exited() {
                    exited.push(format!("nats-server exited by itself ({status})"));
                    server.restart_in_place()?;
                }
            }
            Nats::Cluster(cluster) => {
                for i in 0..cluster.len() {
                    if let Some(status) = cluster.exited(i) {
                        exited.push(format!(
                            "node {} exited by itself ({status})",
                            cluster.name(i)
                        ));
                        cluster.restart(i)?;
                    }
                }
            }
        }
        for what in exited {
            self.violations.push(violation(
                "server",
                format!(
                    "{what} before {} s (out of memory? see its log); restarted",
                    secs(now_ms())
                ),
            ));
        }
        for svc in [Svc::Scheduler, Svc::Loader, Svc::Worker] {
            for r in 0..self.members(svc).len() {
                let exited = self.members(svc)[r]
                    .process
                    .as_mut()
                    .and_then(|p| p.exited());
                if let Some(status) = exited {
                    let what = svc.name();
                    self.violations.push(violation(
                        what,
                        format!(
                            "{what} {r} exited by itself ({status}) before {} s",
                            secs(now_ms())
                        ),
                    ));
                    self.start(svc, r, &[])?;
                }
            }
        }
        Ok(())
    }

    /// The members of `svc` that run now.
    fn running(&mut self, svc: Svc) -> usize {
        self.members(svc)
            .iter()
            .filter(|m| m.process.is_some())
            .count()
    }

    /// Waits until every replica, loader and running worker answers PING.
    fn ready(&mut self, rt: &tokio::runtime::Handle, after: &str) {
        let ping = self.ping.clone();
        for (svc, service) in [
            (Svc::Scheduler, "turnstile-scheduler"),
            (Svc::Loader, "turnstile-alarm-loader"),
            (Svc::Worker, WORKER_SERVICE),
        ] {
            let n = self.running(svc);
            if n == 0 {
                continue;
            }
            if let Err(e) = rt.block_on(wait_for_service(&ping, service, n)) {
                self.violations.push(violation(
                    svc.name(),
                    format!("after {after}: {e} (at {} s)", secs(now_ms())),
                ));
            }
        }
    }

    fn cluster(&mut self) -> Result<&mut NatsCluster> {
        match &mut self.nats {
            Nats::Cluster(c) => Ok(c),
            Nats::Single(_) => bail!("a cluster fault without a cluster"),
        }
    }

    /// The node `node` names now: the log's leader, or one of the others. Without a
    /// known leader, the leader's fault hits some node (noted).
    fn pick(
        &mut self,
        node: Node,
        rt: &tokio::runtime::Handle,
        notes: &mut Vec<String>,
    ) -> Result<usize> {
        let stream = Subjects::default().log_stream();
        let leader_name = rt.block_on(leader_of(&self.operator, &stream));
        let cluster = self.cluster()?;
        let names: Vec<String> = (0..cluster.len()).map(|i| cluster.name(i)).collect();
        let leader = leader_name
            .as_ref()
            .and_then(|l| names.iter().position(|n| n == l));
        let i = match (node, leader) {
            (Node::Leader, Some(l)) => l,
            (Node::Leader, None) => {
                notes.push(format!("{stream} has no known leader"));
                0
            }
            (Node::Follower(k), _) => {
                let others: Vec<usize> = (0..names.len()).filter(|i| Some(*i) != leader).collect();
                others[k % others.len().max(1)]
            }
        };
        notes.push(format!(
            "node {} ({stream} led by {})",
            names[i],
            leader_name.as_deref().unwrap_or("nobody")
        ));
        Ok(i)
    }

    /// After a cluster fault: waits for the log's replicas ([`settle`]).
    fn settle(&mut self, rt: &tokio::runtime::Handle, notes: &mut Vec<String>) -> Result<()> {
        let nodes = self.cluster()?.len();
        notes.push(rt.block_on(settle(&self.operator, nodes)));
        Ok(())
    }

    fn apply(&mut self, fault: &Fault, rt: &tokio::runtime::Handle) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let sleep = |ms: u64| std::thread::sleep(Duration::from_millis(ms));
        match fault {
            Fault::NatsStall { ms } => {
                let Nats::Single(server) = &self.nats else {
                    bail!("nats_stall is for one server");
                };
                let pid = server.pid().context("nats-server is not running")?;
                harness::send_signal(pid, "STOP")?;
                sleep(*ms);
                harness::send_signal(pid, "CONT")?;
            }
            Fault::NatsKill { down_ms } => {
                let Nats::Single(server) = &mut self.nats else {
                    bail!("nats_kill is for one server");
                };
                let pid = server.pid().context("nats-server is not running")?;
                harness::send_signal(pid, "KILL")?;
                sleep(*down_ms);
                server.restart_in_place()?;
            }
            Fault::ReplicaKill { replica, down_ms } => {
                self.kill(Svc::Scheduler, *replica, *down_ms)?
            }
            Fault::LoaderKill { loader, down_ms } => self.kill(Svc::Loader, *loader, *down_ms)?,
            Fault::ReplicaTerm { replica } => {
                self.stop(Svc::Scheduler, *replica, &mut notes);
                self.start(Svc::Scheduler, *replica, &[])?;
            }
            Fault::WorkerKill { worker, down_ms } => {
                notes.push(self.pid_note(Svc::Worker, *worker));
                self.kill(Svc::Worker, *worker, *down_ms)?;
            }
            Fault::WorkerTerm { worker } => {
                notes.push(self.pid_note(Svc::Worker, *worker));
                self.stop(Svc::Worker, *worker, &mut notes);
                self.start(Svc::Worker, *worker, &[])?;
            }
            Fault::WorkerScale { hold_ms } => {
                let spare = self.workers.len().saturating_sub(1);
                self.start(Svc::Worker, spare, &[])?;
                notes.push(self.pid_note(Svc::Worker, spare));
                self.ready(rt, "a worker added");
                sleep(*hold_ms);
                self.stop(Svc::Worker, spare, &mut notes);
            }
            Fault::FeederKill { down_ms } => {
                let feeder = workers::feeder(self, &mut notes);
                notes.push(self.pid_note(Svc::Worker, feeder));
                self.kill(Svc::Worker, feeder, *down_ms)?;
            }
            Fault::LoaderTerm { loader } => {
                self.stop(Svc::Loader, *loader, &mut notes);
                self.start(Svc::Loader, *loader, &[])?;
            }
            Fault::ClockSkew {
                replica,
                skew_ms,
                hold_ms,
            } => {
                let flags = vec!["--clock-skew-ms".to_string(), skew_ms.to_string()];
                self.hold_with(Svc::Scheduler, *replica, &flags, *hold_ms, rt, &mut notes)?;
            }
            Fault::LoaderSkew {
                loader,
                skew_ms,
                hold_ms,
            } => {
                let flags = vec!["--clock-skew-ms".to_string(), skew_ms.to_string()];
                self.hold_with(Svc::Loader, *loader, &flags, *hold_ms, rt, &mut notes)?;
            }
            Fault::Flags {
                replica,
                flags,
                hold_ms,
            } => self.hold_with(Svc::Scheduler, *replica, flags, *hold_ms, rt, &mut notes)?,
            Fault::FullStore { hold_ms } => {
                let url = self.nats.url_as(Role::Operator);
                notes.extend(rt.block_on(full_store(&url, *hold_ms))?);
            }
            Fault::NodeStall { node, ms } => {
                let i = self.pick(*node, rt, &mut notes)?;
                let cluster = self.cluster()?;
                cluster.signal(i, "STOP")?;
                sleep(*ms);
                cluster.signal(i, "CONT")?;
                self.settle(rt, &mut notes)?;
            }
            Fault::NodeKill { follower, down_ms } => {
                let i = self.pick(Node::Follower(*follower), rt, &mut notes)?;
                self.kill_node(i, *down_ms, rt, &mut notes)?;
            }
            Fault::LeaderKill { down_ms } => {
                let i = self.pick(Node::Leader, rt, &mut notes)?;
                self.kill_node(i, *down_ms, rt, &mut notes)?;
            }
            Fault::LeaderStepdown { stream } => {
                self.cluster()?;
                notes.extend(rt.block_on(step_down(&self.operator, stream))?);
                self.settle(rt, &mut notes)?;
            }
        }
        Ok(notes)
    }

    /// "worker 1 pid 1234": which process a fault hit.
    fn pid_note(&mut self, svc: Svc, r: usize) -> String {
        let pid = self.members(svc)[r].process.as_ref().and_then(|p| p.pid());
        format!(
            "{} {r} pid {}",
            svc.name(),
            pid.map_or_else(|| "-".to_string(), |p| p.to_string())
        )
    }

    /// SIGKILLs node `i`, restarts it in place after `down_ms`, waits for the log.
    fn kill_node(
        &mut self,
        i: usize,
        down_ms: u64,
        rt: &tokio::runtime::Handle,
        notes: &mut Vec<String>,
    ) -> Result<()> {
        let cluster = self.cluster()?;
        cluster.kill(i);
        std::thread::sleep(Duration::from_millis(down_ms));
        let restarting = Instant::now();
        cluster.restart(i)?;
        notes.push(format!(
            "{} back in {} s",
            cluster.name(i),
            secs(restarting.elapsed().as_millis() as u64)
        ));
        self.settle(rt, notes)
    }

    /// Restarts member `r` of `svc` with `flags`, lets it serve `hold_ms`, restarts
    /// it as it was.
    fn hold_with(
        &mut self,
        svc: Svc,
        r: usize,
        flags: &[String],
        hold_ms: u64,
        rt: &tokio::runtime::Handle,
        notes: &mut Vec<String>,
    ) -> Result<()> {
        self.stop(svc, r, notes);
        self.start(svc, r, flags)?;
        self.ready(rt, "a restart with other flags");
        std::thread::sleep(Duration::from_millis(hold_ms));
        self.stop(svc, r, notes);
        self.start(svc, r, &[])
    }
}

/// Lowers the log stream's `max_bytes` to what it holds now, waits, restores it.
async fn full_store(operator_url: &str, hold_ms: u64) -> Result<Vec<String>> {
    let js = async_nats::jetstream::new(connect(operator_url).await?);
    let name = Subjects::default().log_stream();
    let mut stream = js.get_stream(&name).await?;
    let info = stream.info().await?;
    let mut config = info.config.clone();
    let original = config.max_bytes;
    config.max_bytes = i64::try_from(info.state.bytes)?.max(1);
    js.update_stream(&config)
        .await
        .context("lowering max_bytes")?;
    let note = format!(
        "max_bytes {} (was {original}) for {} s",
        config.max_bytes,
        secs(hold_ms)
    );
    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
    config.max_bytes = original;
    let mut tries = 0;
    loop {
        match js.update_stream(&config).await {
            Ok(_) => return Ok(vec![note]),
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("chaos: restoring max_bytes: {e}; again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("restoring max_bytes"),
        }
    }
}

/// Runs the fault schedule from `first_ms` until `last_start_ms` (no fault starts
/// later); returns the rig and what happened.
fn inject(
    mut rig: Rig,
    rt: tokio::runtime::Handle,
    plan: Vec<(Fault, u64)>,
    first_ms: u64,
    last_start_ms: u64,
) -> (Rig, Vec<FaultRecord>, Result<()>) {
    let mut records = Vec::new();
    sleep_until(first_ms);
    for (fault, pause) in plan {
        if now_ms() > last_start_ms {
            break;
        }
        if let Err(e) = rig.check_alive() {
            // Said now, not only at the end: the workload goes on without faults.
            println!(
                "[{:>6} s] the fault injector stopped: {e:#}",
                secs(now_ms())
            );
            return (rig, records, Err(e));
        }
        let start_ms = now_ms();
        let notes = match rig.apply(&fault, &rt) {
            Ok(n) => n,
            Err(e) => {
                let e = e.context(format!("injecting {}", fault.describe()));
                println!(
                    "[{:>6} s] the fault injector stopped: {e:#}",
                    secs(now_ms())
                );
                return (rig, records, Err(e));
            }
        };
        rig.ready(&rt, fault.name());
        let end_ms = now_ms();
        println!(
            "[{:>6} s] {} (recovered after {} s){}",
            secs(start_ms),
            fault.describe(),
            secs(end_ms - start_ms),
            if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join("; "))
            }
        );
        records.push(FaultRecord {
            fault,
            start_ms,
            end_ms,
            notes,
        });
        if now_ms() > last_start_ms {
            break;
        }
        std::thread::sleep(Duration::from_millis(pause));
    }
    let alive = rig.check_alive();
    (rig, records, alive)
}

// ---------------------------------------------------------------------------------
// The log

struct EntrySum {
    slot: u64,
    token: Option<u64>,
    message_id: String,
    timestamp_ms: u64,
    headers: Vec<(String, String)>,
    body_hash: Hash32,
    prev_hash: Hash32,
    chain_hash: Hash32,
    run: usize,
}

struct RunSum {
    prev_seq: u64,
    first_slot: u64,
    count: u64,
    seal: Seal,
}

struct ProcessLog {
    entries: Vec<EntrySum>,
    runs: Vec<RunSum>,
}

fn token_of(headers: &[(String, String)]) -> Option<u64> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(TOKEN_HEADER))
        .and_then(|(_, v)| u64::from_str_radix(v, 16).ok())
}

/// Reads the whole log once, in stream order (one ordered consumer over every log
/// subject, deleted when read: a consumer per process would pile up past the server's
/// limit), and judges each process's messages by the rule of schemas/chain.md from
/// genesis, with the published keys. Returns every process's chain, summarised, and
/// the violations of rule 1.
async fn read_all(operator_url: &str) -> Result<(BTreeMap<String, ProcessLog>, Vec<Violation>)> {
    use async_nats::jetstream::consumer;
    let js = async_nats::jetstream::new(connect(operator_url).await?);
    let subjects = Subjects::default();
    let trusted = published_keys(&js).await?;
    let mut stream = js.get_stream(subjects.log_stream()).await?;
    let last = stream.info().await?.state.last_sequence;
    let mut verifiers: HashMap<String, protocol::verify::LogVerifier> = HashMap::new();
    let mut logs: BTreeMap<String, ProcessLog> = BTreeMap::new();
    let mut problems = Vec::new();
    if last > 0 {
        let reader = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subjects.log_all(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let name = reader.cached_info().name.clone();
        let mut messages = reader.messages().await?;
        let read = async {
            while let Some(m) = messages.next().await {
                let m = m.map_err(|e| anyhow::anyhow!("reading the log: {e}"))?;
                let seq = m
                    .info()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .stream_sequence;
                let process = m
                    .subject
                    .rsplit_once('.')
                    .map(|(_, p)| p.to_string())
                    .unwrap_or_else(|| m.subject.to_string());
                let verifier = match verifiers.get_mut(&process) {
                    Some(v) => v,
                    None => {
                        let p = ProcessId::new(process.clone())?;
                        verifiers.entry(process.clone()).or_insert_with(|| {
                            protocol::verify::LogVerifier::from_genesis(p, trusted.clone(), vec![])
                        })
                    }
                };
                let message = journal::reader::LogMessage {
                    seq,
                    headers: m.headers.clone().unwrap_or_default(),
                    payload: m.payload.clone(),
                };
                let log = logs.entry(process.clone()).or_insert_with(|| ProcessLog {
                    entries: Vec::new(),
                    runs: Vec::new(),
                });
                match journal::chain::judge(verifier, message) {
                    journal::chain::Judged::Foreign(f) => {
                        problems.push(violation("log", format!("{process}: {f}")));
                    }
                    journal::chain::Judged::Chain { run, lost } => {
                        for f in lost {
                            problems.push(violation("log", format!("{process}: {f}")));
                        }
                        summarise(log, run.run);
                    }
                }
                if seq >= last {
                    break;
                }
            }
            anyhow::Ok(())
        }
        .await;
        // An ordered consumer recreates itself under another name after a gap; the
        // one it ended as expires by itself.
        let _ = stream.delete_consumer(&name).await;
        read?;
    }
    for (name, log) in &logs {
        if let Some((i, e)) = log
            .entries
            .iter()
            .enumerate()
            .find(|(i, e)| e.slot != *i as u64)
        {
            problems.push(violation(
                "slots",
                format!(
                    "{name}: slot {} at position {i}: a gap or a slot twice",
                    e.slot
                ),
            ));
        }
    }
    Ok((logs, problems))
}

/// Adds `run` to `log`, keeping what the checks need (not the bodies).
fn summarise(log: &mut ProcessLog, run: protocol::wire::Run) {
    let index = log.runs.len();
    log.runs.push(RunSum {
        prev_seq: run.prev_seq,
        first_slot: run.first_slot,
        count: run.entries.len() as u64,
        seal: run.seal,
    });
    for e in run.entries {
        log.entries.push(EntrySum {
            slot: e.slot,
            token: token_of(&e.headers),
            body_hash: Hash32::digest(&e.body),
            message_id: e.message_id,
            timestamp_ms: e.timestamp_ms,
            headers: e.headers,
            prev_hash: e.prev_hash,
            chain_hash: e.chain_hash,
            run: index,
        });
    }
}

/// What the receipt says that the log does not.
fn mismatch(r: &Receipt, e: &EntrySum, run: &RunSum) -> Option<String> {
    let mut d = Vec::new();
    if r.slot != e.slot {
        d.push(format!("slot {} (log {})", r.slot, e.slot));
    }
    if r.message_id != e.message_id {
        d.push(format!(
            "message id {} (log {})",
            r.message_id, e.message_id
        ));
    }
    if r.timestamp_ms != e.timestamp_ms {
        d.push(format!(
            "timestamp {} (log {})",
            r.timestamp_ms, e.timestamp_ms
        ));
    }
    if r.headers != e.headers {
        d.push("headers".into());
    }
    if r.body_hash != e.body_hash {
        d.push("body hash".into());
    }
    if r.prev_hash != e.prev_hash {
        d.push("prev hash".into());
    }
    if r.chain_hash != e.chain_hash {
        d.push("chain hash".into());
    }
    if (r.run_prev_seq, r.run_first_slot, r.run_count) != (run.prev_seq, run.first_slot, run.count)
    {
        d.push(format!(
            "run (prev_seq, first slot, count) {:?} (log {:?})",
            (r.run_prev_seq, r.run_first_slot, r.run_count),
            (run.prev_seq, run.first_slot, run.count)
        ));
    }
    if r.seal != run.seal {
        let keys = |s: &Seal| {
            s.commitments
                .iter()
                .map(|c| c.key_id.clone())
                .collect::<Vec<_>>()
                .join(",")
        };
        d.push(format!(
            "seal (keys {}; log {})",
            keys(&r.seal),
            keys(&run.seal)
        ));
    }
    (!d.is_empty()).then(|| d.join(", "))
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    requests: usize,
    requests_with_id: usize,
    requests_by_kind: BTreeMap<&'static str, usize>,
    attempts: usize,
    retried: usize,
    receipts: usize,
    requests_with_receipt: usize,
    duplicate_receipts: usize,
    aggressive_receipts: usize,
    aggressive_not_kept: usize,
    aggressive_examples: Vec<String>,
    refusals: BTreeMap<&'static str, usize>,
    timeouts: usize,
    no_responders: usize,
    client_errors: usize,
    unanswered: usize,
    unanswered_in_fault_windows: usize,
    unknown_fate_written: usize,
    unknown_fate_absent: usize,
    assignments: usize,
    processes: usize,
    /// Milliseconds from sending to the answer, of answered attempts.
    latency_ms_p50: u64,
    latency_ms_p99: u64,
    latency_ms_max: u64,
    /// Lines of the server's log: replies the server refused (a reply after the
    /// permission to answer was gone, or a second reply), slow consumers cut off.
    server_publish_violations: usize,
    server_slow_consumers: usize,
}

/// Rules 2–6 over every request and the log.
fn check(
    records: &[Record],
    logs: &BTreeMap<String, ProcessLog>,
    windows: &[(u64, u64)],
    counts: &mut Counts,
) -> Vec<Violation> {
    let mut v = Vec::new();
    // Where each token is in the log; ids per process.
    let mut at: HashMap<u64, Vec<(&str, &EntrySum)>> = HashMap::new();
    for (name, log) in logs {
        let mut ids: HashMap<&str, usize> = HashMap::new();
        for e in &log.entries {
            *ids.entry(e.message_id.as_str()).or_default() += 1;
            match e.token {
                Some(t) => at.entry(t).or_default().push((name.as_str(), e)),
                None => v.push(violation(
                    "log",
                    format!("{name} slot {}: an entry the harness did not send", e.slot),
                )),
            }
        }
        for (id, n) in ids.into_iter().filter(|(_, n)| *n > 1) {
            v.push(violation(
                "id",
                format!("{name}: id {id} in the log {n} times"),
            ));
        }
        counts.assignments += log.entries.len();
    }
    counts.processes = logs.len();
    let mut sent: HashMap<u64, &Record> = HashMap::new();
    for r in records {
        sent.insert(r.spec.token, r);
    }
    for (token, places) in &at {
        if !sent.contains_key(token) {
            let (name, e) = places[0];
            v.push(violation(
                "log",
                format!("{name} slot {}: token {token:016x} was never sent", e.slot),
            ));
        }
    }
    let excused = |ms: u64| windows.iter().any(|(a, b)| *a <= ms && ms <= *b);
    let mut latencies: Vec<u64> = records
        .iter()
        .flat_map(|r| &r.attempts)
        .filter(|a| !a.answer.unanswered())
        .map(|a| a.answered_ms.saturating_sub(a.sent_ms))
        .collect();
    latencies.sort_unstable();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    counts.latency_ms_p50 = pick(0.5);
    counts.latency_ms_p99 = pick(0.99);
    counts.latency_ms_max = latencies.last().copied().unwrap_or(0);
    for r in records {
        let s = &r.spec;
        let what = format!(
            "{} request {:016x} to {} ({}{} B{})",
            s.kind.name(),
            s.token,
            s.process,
            if s.id.is_some() { "with id, " } else { "" },
            s.body_len,
            if s.aggressive { ", aggressive" } else { "" }
        );
        let answers = || {
            r.attempts
                .iter()
                .map(|a| format!("{} at {} s", a.answer.label(), secs(a.sent_ms)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        counts.requests += 1;
        counts.requests_with_id += usize::from(s.id.is_some());
        *counts.requests_by_kind.entry(s.kind.name()).or_default() += 1;
        counts.attempts += r.attempts.len();
        counts.retried += usize::from(r.attempts.len() > 1);
        let places = at.get(&s.token).map(Vec::as_slice).unwrap_or_default();
        if places.len() > 1 {
            let slots: Vec<String> = places
                .iter()
                .map(|(p, e)| format!("{p}/{}", e.slot))
                .collect();
            v.push(violation(
                "once",
                format!(
                    "{what} is in the log {} times: {}; answers: {}",
                    places.len(),
                    slots.join(", "),
                    answers()
                ),
            ));
        }
        if let Some((p, e)) = places.iter().find(|(p, _)| *p != s.process.as_str()) {
            v.push(violation(
                "log",
                format!("{what} is in the log of {p} (slot {})", e.slot),
            ));
        }
        let entry = places.first().map(|(p, e)| (*p, *e));
        let mut new_answers = 0;
        let mut durable_receipt = false;
        for a in &r.attempts {
            if a.answer.unanswered() {
                counts.unanswered += 1;
                if excused(a.sent_ms) {
                    counts.unanswered_in_fault_windows += 1;
                } else {
                    v.push(violation(
                        "answered",
                        format!(
                            "{what}: {} for the attempt sent at {} s, outside any fault window",
                            a.answer.label(),
                            secs(a.sent_ms)
                        ),
                    ));
                }
            }
            match &a.answer {
                Answer::Receipt(rc) => {
                    counts.receipts += 1;
                    counts.duplicate_receipts += usize::from(rc.duplicate);
                    new_answers += usize::from(!rc.duplicate && rc.durable);
                    if s.over_limit {
                        v.push(violation(
                            "limits",
                            format!("{what}: past the limit, yet a receipt (slot {})", rc.slot),
                        ));
                    }
                    let found = entry.and_then(|(p, e)| {
                        logs.get(p)
                            .and_then(|l| l.runs.get(e.run))
                            .map(|run| (e, run))
                    });
                    if rc.durable {
                        durable_receipt = true;
                        match found {
                            None => v.push(violation(
                                "acknowledged",
                                format!("{what}: receipt for slot {} at {} s, not in the log; answers: {}", rc.slot, secs(a.answered_ms), answers()),
                            )),
                            Some((e, run)) => {
                                if let Some(d) = mismatch(rc, e, run) {
                                    v.push(violation("receipt", format!("{what}: the receipt does not match the log: {d}")));
                                }
                            }
                        }
                    } else {
                        counts.aggressive_receipts += 1;
                        let broken = match found {
                            None => Some("not in the log".to_string()),
                            Some((e, run)) => mismatch(rc, e, run),
                        };
                        if let Some(how) = broken {
                            counts.aggressive_not_kept += 1;
                            if counts.aggressive_examples.len() < 10 {
                                counts.aggressive_examples.push(format!("{what}: {how}"));
                            }
                        }
                    }
                }
                Answer::Refused(code, message) => {
                    *counts.refusals.entry(code.as_str()).or_default() += 1;
                    if *code == ErrorCode::TooLarge && !s.over_limit {
                        v.push(violation(
                            "limits",
                            format!("{what}: within the limits, refused too_large: {message}"),
                        ));
                    }
                }
                Answer::Timeout => counts.timeouts += 1,
                Answer::NoResponders => counts.no_responders += 1,
                Answer::Failed(_) => counts.client_errors += 1,
            }
            if s.over_limit
                && !a.answer.unanswered()
                && !matches!(
                    a.answer,
                    Answer::Refused(ErrorCode::TooLarge, _) | Answer::Receipt(..)
                )
            {
                v.push(violation(
                    "limits",
                    format!("{what}: past the limit, answered {}", a.answer.label()),
                ));
            }
        }
        if new_answers > 1 {
            v.push(violation(
                "receipt",
                format!(
                    "{what}: {new_answers} durable receipts say duplicate: false; answers: {}",
                    answers()
                ),
            ));
        }
        if durable_receipt {
            counts.requests_with_receipt += 1;
        } else if r
            .attempts
            .iter()
            .any(|a| matches!(a.answer, Answer::Receipt(..)))
        {
            // Only aggressive receipts: counted above.
        } else if r.attempts.iter().any(|a| a.answer.may_be_written()) {
            if entry.is_some() {
                counts.unknown_fate_written += 1;
            } else {
                counts.unknown_fate_absent += 1;
            }
        } else if let Some((p, e)) = entry {
            v.push(violation(
                "refused",
                format!(
                    "{what}: every answer a definite refusal ({}), yet in the log at {p}/{}",
                    answers(),
                    e.slot
                ),
            ));
        }
    }
    v
}

/// Every receipt checked alone (`Receipt::check` with the body it was given for: the
/// chain step, the Merkle path, the seal), on every core.
fn receipts_check_alone(records: &[Record]) -> Vec<Violation> {
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let chunk = records.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = records
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut v = Vec::new();
                    for r in part {
                        let mut body = None;
                        for a in &r.attempts {
                            if let Answer::Receipt(rc) = &a.answer {
                                let body = body.get_or_insert_with(|| r.spec.body());
                                if let Err(e) = rc.check(Some(body)) {
                                    v.push(violation(
                                        "receipt",
                                        format!(
                                            "request {:016x} to {}: the receipt for slot {} does not check alone: {e}",
                                            r.spec.token, r.spec.process, rc.slot
                                        ),
                                    ));
                                }
                            }
                        }
                    }
                    v
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![violation("harness", "a thread checking receipts panicked")]
                })
            })
            .collect()
    })
}

/// Runs `turnstile verify --all --json` (as the anonymous client) and checks rule 8.
async fn verify_cli(
    url: &str,
    counts: &Counts,
    dir: &Path,
) -> Result<(serde_json::Value, Vec<Violation>)> {
    // Output to files: on a timeout the child is killed and what it said is kept.
    let (out_path, err_path) = (dir.join("verify.json"), dir.join("verify.err"));
    let mut child = tokio::process::Command::new(harness::workspace_bin("turnstile")?)
        .args(["verify", "--all", "--json"])
        .env("NATS_URL", url)
        .env_remove("NATS_CREDS")
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .kill_on_drop(true)
        .spawn()?;
    let limit_secs =
        VERIFY_TIMEOUT_SECS + counts.assignments as u64 / VERIFY_ASSIGNMENTS_PER_EXTRA_SEC;
    let limit = Duration::from_secs(limit_secs);
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => Some(status?),
        Err(_) => {
            child.kill().await?;
            None
        }
    };
    let stdout = std::fs::read(&out_path)?;
    let stderr = std::fs::read_to_string(&err_path)?;
    let tail = |s: &str| {
        let start = s.len().saturating_sub(2000);
        s.get(start..).unwrap_or(s).to_string()
    };
    let doc: serde_json::Value = serde_json::from_slice(&stdout)
        .unwrap_or_else(|_| json!({"unparsed_stdout": tail(&String::from_utf8_lossy(&stdout))}));
    let mut v = Vec::new();
    match status.and_then(|s| s.code()) {
        Some(0) => {}
        code => v.push(violation(
            "verify",
            match status {
                None => format!(
                    "turnstile verify --all did not finish within {limit_secs} s (killed); stderr: {}",
                    tail(&stderr)
                ),
                Some(_) => format!(
                    "turnstile verify --all exited {code:?}: totals {}; stderr: {}",
                    doc["totals"],
                    tail(&stderr)
                ),
            },
        )),
    }
    let assignments = doc["totals"]["assignments"].as_u64();
    if status.is_some() && assignments != Some(counts.assignments as u64) {
        v.push(violation(
            "verify",
            format!(
                "turnstile verify --all counts {assignments:?} assignments, the harness read {}",
                counts.assignments
            ),
        ));
    }
    Ok((doc, v))
}

// ---------------------------------------------------------------------------------
// The run

struct Outcome {
    seed: u64,
    counts: Counts,
    faults: Vec<FaultRecord>,
    events: Vec<Event>,
    violations: Vec<Violation>,
    verify: serde_json::Value,
    limits: Limits,
    elapsed_ms: u64,
    logs: Vec<PathBuf>,
    /// The servers' logs, each with the name it is kept under.
    nats_logs: Vec<(String, PathBuf)>,
    injector_error: Option<String>,
    /// The alarm-loader scenario's verdict (`--alarms`).
    alarms: Option<alarms::Verdict>,
    /// The worker scenario's verdict (`--workers`).
    workers: Option<workers::Verdict>,
}

/// What a run starts with: the servers, replicas (and loaders) up and answering.
struct Setup {
    rig: Rig,
    work: tempfile::TempDir,
    ping: async_nats::Client,
    client_url: String,
    operator_url: String,
    nats_logs: Vec<(String, PathBuf)>,
}

/// How the worker scenario's instances start: their group, handler script and flags,
/// how many run from the start (one more is the spare of a scale-out).
struct WorkerSpec {
    group: String,
    script: String,
    flags: Vec<String>,
    instances: usize,
}

/// The worker instances' service name (services API).
const WORKER_SERVICE: &str = "turnstile-worker";

/// Starts the servers, `args.replicas` scheduler replicas, `loaders` alarm-loaders and
/// the worker instances of `worker`, and waits until every one answers PING.
async fn setup(args: &Args, loaders: usize, worker: Option<WorkerSpec>) -> Result<Setup> {
    let nats = if args.cluster {
        Nats::Cluster(NatsCluster::start(3)?)
    } else {
        Nats::Single(NatsServer::start()?)
    };
    let work = tempfile::Builder::new()
        .prefix("turnstile-chaos-")
        .tempdir()?;
    let keys = [test_key(201), test_key(202)];
    let mut replicas = Vec::new();
    for r in 0..args.replicas {
        replicas.push(Replica {
            key: Some(key_file(work.path(), &keys[r % keys.len()])?),
            process: None,
            log: work.path().join(format!("replica-{r}.log")),
            starts: 0,
        });
    }
    let client_url = nats.url();
    let operator_url = nats.url_as(Role::Operator);
    let ping = connect(&client_url).await?;
    let nats_logs = nats.logs();
    let loaders = (0..loaders)
        .map(|l| Replica {
            key: None,
            process: None,
            log: work.path().join(format!("loader-{l}.log")),
            starts: 0,
        })
        .collect();
    let workers = worker.as_ref().map_or(0, |w| w.instances + 1);
    let workers = (0..workers)
        .map(|w| Replica {
            key: None,
            process: None,
            log: work.path().join(format!("worker-{w}.log")),
            starts: 0,
        })
        .collect();
    let worker_instances = worker.as_ref().map_or(0, |w| w.instances);
    let mut rig = Rig {
        flags: nats.scheduler_flags(),
        loader_flags: nats.loader_flags(),
        workers,
        worker,
        worker_exits: Vec::new(),
        nats,
        replicas,
        loaders,
        ping: ping.clone(),
        operator: connect(&operator_url).await?,
        violations: Vec::new(),
    };
    for r in 0..rig.replicas.len() {
        rig.start(Svc::Scheduler, r, &[])?;
    }
    for l in 0..rig.loaders.len() {
        rig.start(Svc::Loader, l, &[])?;
    }
    wait_for_schedulers(&ping, rig.replicas.len()).await?;
    wait_for_service(&ping, "turnstile-alarm-loader", rig.loaders.len()).await?;
    // After the schedulers: a worker's feeder reads their published keys.
    for w in 0..worker_instances {
        rig.start(Svc::Worker, w, &[])?;
    }
    wait_for_service(&ping, WORKER_SERVICE, worker_instances).await?;
    Ok(Setup {
        rig,
        work,
        ping,
        client_url,
        operator_url,
        nats_logs,
    })
}

async fn run(args: &Args, seed: u64) -> Result<Outcome> {
    let kinds = fault_kinds(args.cluster, Scenario::Scheduler, &args.faults)?;
    let Setup {
        rig,
        work,
        ping,
        client_url,
        operator_url,
        nats_logs,
    } = setup(args, 0, None).await?;
    let limits = Limits::fetch(&ping).await?;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(
            Client::new(connect(&client_url).await?, Subjects::default())
                .with_timeout(Duration::from_secs(args.timeout)),
        );
    }
    let duration_ms = args.duration * 1000;
    let started = now_ms();
    let stop_ms = started + duration_ms;
    let ctx = Arc::new(Ctx {
        clients,
        records: Mutex::new(Vec::new()),
        tracker: TaskTracker::new(),
        next_client: AtomicUsize::new(0),
        stop_ms,
        seed,
        limits,
        processes: args.processes,
        scale: args.scale,
    });
    println!(
        "chaos: {} replicas on {}, limits: body {} B, request {} B, id {} B",
        args.replicas,
        rig.nats.describe(),
        limits.max_body,
        limits.max_request_bytes,
        limits.max_message_id
    );

    let events = plan_events(seed, duration_ms, args.scale);
    let events_task = tokio::spawn(run_events(Arc::clone(&ctx), {
        events
            .iter()
            .map(|e| Event {
                at_ms: e.at_ms + started,
                ..e.clone()
            })
            .collect()
    }));
    let mut workers = Vec::new();
    for w in 0..args.clients {
        workers.push(tokio::spawn(steady(Arc::clone(&ctx), w as u64)));
    }
    let plan = if args.no_faults {
        Vec::new()
    } else {
        plan_faults(seed, args.replicas, 0, 0, &kinds)
    };
    let rt = tokio::runtime::Handle::current();
    let last_start = stop_ms.saturating_sub(20_000);
    let injector =
        tokio::task::spawn_blocking(move || inject(rig, rt, plan, started + 8_000, last_start));

    for w in workers {
        w.await??;
    }
    events_task.await??;
    let (mut rig, faults, injected) = injector.await?;
    let injector_error = injected.err().map(|e| format!("{e:#}"));
    ctx.tracker.close();
    let longest = RETRY_SPAN_MS / 1000 + 2 * args.timeout + 30;
    if tokio::time::timeout(Duration::from_secs(longest), ctx.tracker.wait())
        .await
        .is_err()
    {
        bail!("requests still outstanding {longest} s after the workload ended");
    }
    let workload_end = now_ms();
    println!(
        "[{:>6} s] workload done; every request answered or timed out; reading the log",
        secs(workload_end)
    );
    rig.check_alive()?;
    if let Err(e) = wait_for_schedulers(&ping, args.replicas).await {
        rig.violations.push(violation(
            "replica",
            format!("after the workload: {e} (at {} s)", secs(now_ms())),
        ));
    }

    let records = std::mem::take(
        &mut *ctx
            .records
            .lock()
            .map_err(|_| anyhow::anyhow!("records poisoned"))?,
    );
    let timeout_ms = args.timeout * 1000;
    let windows: Vec<(u64, u64)> = faults
        .iter()
        .filter(|f| f.fault.loses_in_flight())
        .map(|f| {
            (
                f.start_ms.saturating_sub(timeout_ms + 1_000),
                f.end_ms + FAULT_GRACE_MS,
            )
        })
        .collect();
    let reading = now_ms();
    let (logs, mut violations) = read_all(&operator_url).await?;
    println!(
        "[{:>6} s] read {} processes' logs in {} s",
        secs(now_ms()),
        logs.len(),
        secs(now_ms() - reading)
    );
    let mut counts = Counts::default();
    violations.extend(check(&records, &logs, &windows, &mut counts));
    let checking = now_ms();
    violations.extend(receipts_check_alone(&records));
    println!(
        "[{:>6} s] checked {} requests' answers against the log and every receipt alone in {} s",
        secs(now_ms()),
        records.len(),
        secs(now_ms() - checking)
    );
    drop(logs);
    let (verify, v) = verify_cli(&client_url, &counts, work.path()).await?;
    violations.extend(v);
    println!(
        "[{:>6} s] turnstile verify --all: {}",
        secs(now_ms()),
        if verify["ok"].as_bool().unwrap_or(false) {
            "ok"
        } else {
            "NOT ok"
        }
    );
    rig.stop_all();
    let server_logs: Vec<String> = nats_logs
        .iter()
        .map(|(_, path)| std::fs::read_to_string(path).unwrap_or_default())
        .collect();
    let observed = |what: &str| {
        server_logs
            .iter()
            .flat_map(|log| log.lines())
            .filter(|l| l.contains(what))
            .count()
    };
    counts.server_publish_violations = observed("Publish Violation");
    counts.server_slow_consumers = observed("Slow Consumer");
    let mut all = std::mem::take(&mut rig.violations);
    all.extend(violations);
    let mut logs: Vec<PathBuf> = rig.replicas.iter().map(|r| r.log.clone()).collect();
    logs.push(work.path().join("verify.err"));
    let outcome = Outcome {
        seed,
        counts,
        faults,
        events,
        violations: all,
        verify,
        limits,
        elapsed_ms: now_ms() - started,
        logs: logs.clone(),
        nats_logs: nats_logs.clone(),
        injector_error,
        alarms: None,
        workers: None,
    };
    if !outcome.violations.is_empty() || outcome.injector_error.is_some() {
        keep_logs(seed, &logs, &nats_logs);
    }
    drop(rig);
    drop(work);
    Ok(outcome)
}

/// Copies the replicas' and the server's logs to `bench-results/chaos-<seed>/`.
fn keep_logs(seed: u64, logs: &[PathBuf], nats_logs: &[(String, PathBuf)]) {
    let dir = PathBuf::from(format!("bench-results/chaos-{seed}"));
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let named = logs
        .iter()
        .filter_map(|l| Some((l.file_name()?.to_string_lossy().into_owned(), l)));
    for (name, l) in named.chain(nats_logs.iter().map(|(n, l)| (n.clone(), l))) {
        let _ = std::fs::copy(l, dir.join(name));
    }
    println!("logs kept in {}", dir.display());
}

fn summary(args: &Args, o: &Outcome) -> String {
    if let Some(a) = &o.alarms {
        return alarms::summary(args, o, a)
            .iter()
            .map(|(k, v)| format!("  {k:<13} {v}\n"))
            .collect();
    }
    if let Some(w) = &o.workers {
        return workers::summary(args, o, w)
            .iter()
            .map(|(k, v)| format!("  {k:<13} {v}\n"))
            .collect();
    }
    let c = &o.counts;
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &o.faults {
        *faults.entry(f.fault.name()).or_default() += 1;
    }
    let join = |m: &BTreeMap<&str, usize>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let verify_ok = o.verify["ok"].as_bool().unwrap_or(false);
    let rows = [
        (
            "seed",
            format!("{} (replay: {})", o.seed, replay(args, o.seed)),
        ),
        (
            "ran",
            format!(
                "{} s, {} replicas, {}, {} build",
                secs(o.elapsed_ms),
                args.replicas,
                if args.cluster {
                    "a 3-node cluster (log and buckets R3)"
                } else {
                    "one nats-server"
                },
                profile()
            ),
        ),
        (
            "requests",
            format!(
                "{} ({} with id, {} retried; {})",
                c.requests,
                c.requests_with_id,
                c.retried,
                join(&c.requests_by_kind)
            ),
        ),
        ("attempts", c.attempts.to_string()),
        (
            "receipts",
            format!(
                "{} ({} durable, for {} requests; {} duplicate answers; aggressive {}, not kept by the log {})",
                c.receipts,
                c.receipts - c.aggressive_receipts,
                c.requests_with_receipt,
                c.duplicate_receipts,
                c.aggressive_receipts,
                c.aggressive_not_kept
            ),
        ),
        ("refusals", join(&c.refusals)),
        (
            "latency",
            format!(
                "p50 {} ms, p99 {} ms, max {} ms (answered attempts)",
                c.latency_ms_p50, c.latency_ms_p99, c.latency_ms_max
            ),
        ),
        (
            "unanswered",
            format!(
                "{} (timeouts {}, no responders {}, client errors {}); in fault windows {}",
                c.unanswered,
                c.timeouts,
                c.no_responders,
                c.client_errors,
                c.unanswered_in_fault_windows
            ),
        ),
        (
            "unknown fate",
            format!(
                "{} written, {} not",
                c.unknown_fate_written, c.unknown_fate_absent
            ),
        ),
        (
            "log",
            format!(
                "{} assignments in {} processes; turnstile verify --all: {}",
                c.assignments,
                c.processes,
                if verify_ok { "ok" } else { "NOT ok" }
            ),
        ),
        ("faults", format!("{} ({})", o.faults.len(), join(&faults))),
        (
            "server log",
            format!(
                "{} publish violations (refused replies), {} slow consumers",
                c.server_publish_violations, c.server_slow_consumers
            ),
        ),
        ("violations", o.violations.len().to_string()),
    ];
    rows.iter()
        .map(|(k, v)| format!("  {k:<13} {v}\n"))
        .collect()
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// The command that replays a run (`make chaos` has no `--faults`).
fn replay(args: &Args, seed: u64) -> String {
    if args.faults.is_empty() {
        format!(
            "make chaos DURATION={} SEED={seed}{}{}",
            args.duration,
            if args.cluster { " CLUSTER=1" } else { "" },
            match Scenario::of(args) {
                Scenario::Alarms => " ALARMS=1",
                Scenario::Workers => " WORKERS=1",
                Scenario::Scheduler => "",
            }
        )
    } else {
        format!(
            "./target/{}/chaos --duration {} --seed {seed}{}{} --faults {}",
            profile(),
            args.duration,
            if args.cluster { " --cluster" } else { "" },
            match Scenario::of(args) {
                Scenario::Alarms => " --alarms",
                Scenario::Workers => " --workers",
                Scenario::Scheduler => "",
            },
            args.faults.join(",")
        )
    }
}

fn write_json(args: &Args, o: &Outcome) -> Result<()> {
    let doc = json!({
        "seed": o.seed,
        "duration_s": args.duration,
        "cluster": args.cluster,
        "elapsed_s": o.elapsed_ms as f64 / 1000.0,
        "replicas": args.replicas,
        "build": profile(),
        "limits": o.limits,
        "ok": o.violations.is_empty() && o.injector_error.is_none(),
        "counts": o.counts,
        "faults": o.faults,
        "events": o.events,
        "violations_total": o.violations.len(),
        "violations": o.violations.iter().take(200).collect::<Vec<_>>(),
        "injector_error": o.injector_error,
        "verify": {"ok": o.verify["ok"], "totals": o.verify["totals"]},
        "alarms": o.alarms,
        "workers": o.workers,
        "logs": o.logs,
        "nats_logs": o.nats_logs.iter().map(|(_, p)| p).collect::<Vec<_>>(),
    });
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&doc)?)?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    now_ms();
    println!(
        "chaos: seed {seed}, {} s (replay: {})",
        args.duration,
        replay(&args, seed)
    );
    let ran = match Scenario::of(&args) {
        Scenario::Alarms => alarms::run(&args, seed).await,
        Scenario::Workers => workers::run(&args, seed).await,
        Scenario::Scheduler => run(&args, seed).await,
    };
    let outcome = match ran {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "chaos: the harness failed: {e:#}\nseed {seed} (replay: {})",
                replay(&args, seed)
            );
            std::process::exit(2);
        }
    };
    print!("{}", summary(&args, &outcome));
    write_json(&args, &outcome)?;
    println!("results: {}", args.out.display());
    if let Some(e) = &outcome.injector_error {
        eprintln!("chaos: the fault injector failed: {e}");
    }
    if outcome.violations.is_empty() && outcome.injector_error.is_none() {
        println!("chaos: ok");
        return Ok(());
    }
    println!(
        "\nchaos: FAILED with {} violation(s); seed {seed} (replay: {})",
        outcome.violations.len(),
        replay(&args, seed)
    );
    println!("fault timeline:");
    for f in &outcome.faults {
        println!(
            "  {:>6}–{:>6} s  {}",
            secs(f.start_ms),
            secs(f.end_ms),
            f.fault.describe()
        );
    }
    let mut by_rule: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &outcome.violations {
        *by_rule.entry(v.rule).or_default() += 1;
    }
    println!("violations by rule: {by_rule:?}; the first ones:");
    for v in outcome.violations.iter().take(25) {
        println!("  [{}] {}", v.rule, v.detail);
    }
    std::process::exit(
        if outcome.injector_error.is_some() && outcome.violations.is_empty() {
            2
        } else {
            1
        },
    );
}
