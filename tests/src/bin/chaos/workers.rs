//! `--workers` (`make chaos WORKERS=1`): a worker group under injected faults, checked
//! from the log, the jobs' results and what the handler saw.
//!
//! The rig is the one of the scheduler scenario (one nats-server, `--replicas`
//! scheduler replicas that take the jobs' requests, never faulted here) plus
//! `--instances` instances of the real `worker` binary in one group (`chaos`, unordered,
//! `--max-attempts 4`, backoff 300 ms doubling to 2 s, `--ack-wait-ms 20000`: longer
//! than the longest stall), and one spare instance a scale-out fault starts for a
//! while. The handler is `sh -c`: it appends `start <process>:<slot> <pid> <ms> <ppid>
//! <execution key> <fencing token>` (`-` for none) to a file, fails (exit 1, a `fail`
//! line) while the job has started no more times than its body says, sleeps as long as
//! its body says, then appends `end ...`. The instances' execution-key lease is 3 s.
//!
//! A seeded workload schedules (each request with a `Nats-Msg-Id`, sent again with the
//! same id while its fate is unknown) into 50 processes for `--duration` seconds: quick
//! jobs, long ones (1–3 s, so that kills hit them mid-job), jobs that fail their first
//! attempt or two, jobs that always fail (dead after four attempts). Meanwhile it
//! pauses a process (the key `turnstile queue pause` writes in the workers bucket),
//! schedules jobs into it, cancels some of those (the key `turnstile job cancel`
//! writes), and resumes it 8–12 s later; and it cancels long jobs while they run.
//!
//! Faults, seeded and one at a time through the scheduler scenario's injector: an
//! instance killed (SIGKILL: its children die with it) and restarted after 0–3 s, an
//! instance stopped (SIGTERM) and restarted, one more instance started for 6–15 s and
//! stopped (a scale 2→3→2), the instance that feeds the group killed, nats-server
//! stalled (SIGSTOP 2–10 s) or killed and restarted in place. Not with `--cluster`.
//!
//! After the workload, up to `--settle` seconds for every job to end; then from the
//! log (every assignment is a job), the results (`ts.result.chaos.>`) and the handler's
//! file it checks:
//! 1. every job of the log has exactly one final event (`done`, `dead`, `cancelled`),
//!    and no event names a job the log does not hold; no `fault` event (nothing
//!    foreign was fed);
//! 2. a `done` job's handler ran, and ran to its end; a run after the first is either
//!    the retry of a failed run, or follows a run that a fault cut or whose result it
//!    kept from being recorded: an instance SIGKILLed or the server killed between the
//!    two starts — such reruns are counted by fault; one no such fault explains is a
//!    violation, and two runs of a job at once are always one;
//! 3. the policy: a `failed` event's attempt is below the maximum, attempts rise, a
//!    `dead` one's is at the maximum or above (the work stream's delivery count: a
//!    job handed back counts), a retry starts no sooner than the backoff of its failed
//!    attempt, a job recorded failed had that many failing runs, and a job that always
//!    fails ends `dead` (unless cancelled);
//! 4. a cancelled job never started more than a second after its cancel was
//!    acknowledged, and ended `cancelled` (or `done` by then); one cancelled while
//!    queued in a paused process never ran at all; nothing is `cancelled` that was not;
//! 5. no job of a paused process started from a second after the pause was
//!    acknowledged until the resume was sent;
//! 6. execution keys (`Ts-Execution-Key`, four keys shared by jobs of many processes):
//!    no two runs of one key overlapped, from the handler's record (a run cut short is
//!    bounded by its attempt's result, its instance's exit or its "lease lost" line;
//!    one none bounds is counted and printed), and the fencing token grew from each
//!    run of a key to the next; a run after a lost lease is a retry, counted;
//! 7. queue keys (`Ts-Queue-Key`): every `queue_key_held` refusal had a job of its
//!    process and key queued (its request sent before the refusal was answered, not
//!    started when it was sent), or is attributed to a pending hold of a request of
//!    unknown fate or to a release the instance logged as failed; no job was assigned
//!    more than a second before an earlier job of its key started unless a fault
//!    that delays a start lies between (attributed); no hold is left after settling
//!    for a finished job.

use std::collections::BTreeSet;

use protocol::queue::Hold;
use worker::job::{ResultEvent, State};

use super::*;

/// The worker group.
const GROUP: &str = "chaos";
/// Processes of the steady workload.
const PROCESSES: usize = 50;
/// The group's policy.
const MAX_ATTEMPTS: u32 = 4;
const BACKOFF_MS: u64 = 300;
const BACKOFF_MAX_MS: u64 = 2_000;
/// Longer than the longest stall, so a stall alone hands no running job out again.
const ACK_WAIT_MS: u64 = 20_000;
/// A body's failure count that means "always".
const ALWAYS: u32 = 99;
/// How long after its acknowledgement a pause or cancel must hold.
const GRACE_MS: u64 = 1_000;
/// Slack for the backoff check (the instance's clock against the shell's `date`).
const BACKOFF_SLACK_MS: u64 = 100;
/// A request's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A request is sent again while its first attempt is younger than this.
const RETRY_SPAN_MS: u64 = 60_000;
/// RNG stream of the workload.
const STREAM_JOBS: u64 = 1 << 23;
/// Execution keys (`Ts-Execution-Key`), each shared by jobs of many processes.
const EXEC_KEYS: usize = 4;
/// The instances' execution-key lease (`--exec-key-lease-ms`): short, so that a
/// server stall (2–10 s) outlasts it and holders give their keys up mid-run.
const EXEC_KEY_LEASE_MS: u64 = 3_000;
/// Processes of the queue-key workload (`Ts-Queue-Key`), and keys in each.
const QUEUE_PROCESSES: usize = 4;
const QUEUE_KEYS: usize = 3;
/// The queue key the pause episodes send into their paused process.
const PAUSED_KEY: &str = "pk";

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The handler: appends what it does to `out`.
fn script(out: &Path) -> String {
    format!(
        "b=$(cat); set -- $b; k=\"$TS_PROCESS:$TS_SLOT\"; o={o}; \
         echo \"start $k $$ $(date +%s%3N) $PPID ${{TS_HEADER_TS_EXECUTION_KEY:--}} ${{TS_EXECUTION_TOKEN:--}}\" >> $o; \
         n=$(grep -c \"^start $k \" $o); \
         if [ \"$n\" -le \"$1\" ]; then echo \"fail $k $$ $(date +%s%3N) $PPID\" >> $o; exit 1; fi; \
         if [ \"$2\" -gt 0 ]; then sleep \"$(($2 / 1000)).$(($2 % 1000 / 100))\"; fi; \
         echo \"end $k $$ $(date +%s%3N) $PPID\" >> $o",
        o = out.display()
    )
}

/// A job as sent: its body says how often it fails and how long it takes.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    fails: u32,
}

/// What one attempt of a queue-keyed request got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    /// A receipt: assigned this slot.
    Slot(u64),
    /// Refused `queue_key_held` (the `Ts-Error` header's code).
    Held,
    /// Any other answer or none (sent again with the same id while young enough).
    Other(String),
}

/// One attempt of a queue-keyed request: sent and answered (wall ms), and the answer.
#[derive(Debug, Clone)]
struct Answer {
    sent_ms: u64,
    answered_ms: u64,
    got: Got,
}

/// A request with a queue key and every answer it got.
#[derive(Debug, Clone)]
struct Queued {
    process: String,
    key: String,
    id: String,
    answers: Vec<Answer>,
}

impl Queued {
    fn first_sent(&self) -> u64 {
        self.answers.first().map_or(u64::MAX, |a| a.sent_ms)
    }

    /// Whether an answer left its write's fate unknown (a hold may stay pending).
    fn unknown(&self) -> bool {
        self.answers.iter().any(|a| match &a.got {
            Got::Other(code) => fate_unknown(code),
            _ => false,
        })
    }
}

/// Answers after which the request may or may not have been written (ARCHITECTURE.md
/// "Queue keys", the life of a hold: such an answer leaves the hold pending).
fn fate_unknown(code: &str) -> bool {
    matches!(code, "unavailable" | "remote_timeout" | "internal") || code.starts_with("no answer")
}

/// A pause: acknowledged at `acked_ms`, its resume sent at `resumed_ms`.
#[derive(Debug, Clone, Serialize)]
struct Pause {
    process: String,
    acked_ms: u64,
    resumed_ms: u64,
}

/// A cancel, acknowledged at `acked_ms`; `queued`: while its process was paused.
#[derive(Debug, Clone, Serialize)]
struct Cancel {
    job: String,
    acked_ms: u64,
    queued: bool,
}

struct Work {
    client: Client,
    kv: async_nats::jetstream::kv::Store,
    out: PathBuf,
    sent: Mutex<Vec<Sent>>,
    queued: Mutex<Vec<Queued>>,
    pauses: Mutex<Vec<Pause>>,
    cancels: Mutex<Vec<Cancel>>,
    next: AtomicUsize,
    tracker: TaskTracker,
    stop_ms: u64,
}

impl Work {
    /// Schedules a job failing `fails` times and taking `sleep_ms` into `process`; its
    /// slot, if an answer said.
    async fn schedule(&self, process: &str, fails: u32, sleep_ms: u64) -> Option<u64> {
        self.schedule_with(process, fails, sleep_ms, Vec::new())
            .await
    }

    /// [`Work::schedule`] with headers (an execution key).
    async fn schedule_with(
        &self,
        process: &str,
        fails: u32,
        sleep_ms: u64,
        headers: Vec<(String, String)>,
    ) -> Option<u64> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("wc-{n}-{fails}-{sleep_ms}");
        let body = Bytes::from(format!("{fails} {sleep_ms} {n}"));
        if let Ok(mut sent) = self.sent.lock() {
            sent.push(Sent {
                id: id.clone(),
                fails,
            });
        }
        let p = ProcessId::new(process).ok()?;
        let opts = Schedule {
            message_id: Some(id),
            headers,
            ..Default::default()
        };
        let first = now_ms();
        loop {
            match self.client.schedule(&p, body.clone(), &opts).await {
                Ok(r) => return Some(r.slot),
                Err(_) if now_ms() < first + RETRY_SPAN_MS => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(_) => return None,
            }
        }
    }

    /// Schedules a quick job with queue key `key` into `process`, recording every
    /// answer; sent again (same id) while its fate is unknown, not after a refusal.
    async fn schedule_queued(&self, process: &str, key: &str, sleep_ms: u64) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("wc-{n}-0-{sleep_ms}");
        let body = Bytes::from(format!("0 {sleep_ms} {n}"));
        if let Ok(mut sent) = self.sent.lock() {
            sent.push(Sent {
                id: id.clone(),
                fails: 0,
            });
        }
        let Ok(p) = ProcessId::new(process) else {
            return;
        };
        let opts = Schedule {
            message_id: Some(id.clone()),
            headers: vec![(journal::subjects::QUEUE_KEY.to_string(), key.to_string())],
            ..Default::default()
        };
        let mut answers = Vec::new();
        let first = now_ms();
        loop {
            let sent_ms = wall_ms();
            let got = match self.client.schedule(&p, body.clone(), &opts).await {
                Ok(r) => Got::Slot(r.slot),
                Err(journal::Error::Refused {
                    code: ErrorCode::QueueKeyHeld,
                    ..
                }) => Got::Held,
                Err(journal::Error::Refused { code, .. }) => Got::Other(code.as_str().into()),
                Err(e) => Got::Other(format!("no answer ({e})")),
            };
            let again = matches!(got, Got::Other(_)) && now_ms() < first + RETRY_SPAN_MS;
            answers.push(Answer {
                sent_ms,
                answered_ms: wall_ms(),
                got,
            });
            if !again {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let Ok(mut q) = self.queued.lock() {
            q.push(Queued {
                process: process.to_string(),
                key: key.to_string(),
                id,
                answers,
            });
        }
    }

    fn spawn_queued(self: &Arc<Self>, process: String, key: String, sleep_ms: u64) {
        let me = Arc::clone(self);
        self.tracker.spawn(async move {
            me.schedule_queued(&process, &key, sleep_ms).await;
        });
    }

    fn spawn_keyed(self: &Arc<Self>, process: String, fails: u32, sleep_ms: u64, key: String) {
        let me = Arc::clone(self);
        let headers = vec![(journal::subjects::EXECUTION_KEY.to_string(), key)];
        self.tracker.spawn(async move {
            me.schedule_with(&process, fails, sleep_ms, headers).await;
        });
    }

    fn spawn(self: &Arc<Self>, process: String, fails: u32, sleep_ms: u64) {
        let me = Arc::clone(self);
        self.tracker.spawn(async move {
            me.schedule(&process, fails, sleep_ms).await;
        });
    }

    /// Puts (or deletes) a control key until the bucket acknowledges it; when.
    async fn control(&self, key: &str, put: bool) -> u64 {
        loop {
            let done = if put {
                self.kv.put(key, Bytes::from_static(b"chaos")).await.is_ok()
            } else {
                self.kv.delete(key).await.is_ok()
            };
            if done {
                return wall_ms();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The steady stream of jobs, seeded: `(fails, sleep_ms)`.
fn kind(rng: &mut ChaCha8Rng) -> (u32, u64) {
    match rng.gen_range(0..100) {
        0..=54 => (0, rng.gen_range(0..=200)),
        55..=72 => (0, rng.gen_range(1_000..=3_000)),
        73..=82 => (1, rng.gen_range(0..=200)),
        83..=88 => (2, 0),
        89..=93 => (1, rng.gen_range(1_000..=2_000)),
        _ => (ALWAYS, 0),
    }
}

async fn steady(work: Arc<Work>, mut rng: ChaCha8Rng) {
    while now_ms() < work.stop_ms {
        let p = format!("p{}", rng.gen_range(0..PROCESSES));
        let (fails, sleep_ms) = kind(&mut rng);
        work.spawn(p, fails, sleep_ms);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..=450))).await;
    }
}

/// Jobs with execution keys: bursts of one to three jobs sharing one of
/// [`EXEC_KEYS`] keys, in any steady process, 200–800 ms long (one in six 2–4 s: a
/// server stall outlasts their lease's deadline, so holders give keys up mid-run), a
/// quarter failing their first attempt (the retry takes the key again).
async fn exec_keyed(work: Arc<Work>, mut rng: ChaCha8Rng) {
    while now_ms() < work.stop_ms {
        let key = format!("e{}", rng.gen_range(0..EXEC_KEYS));
        for _ in 0..rng.gen_range(1..=3) {
            let p = format!("p{}", rng.gen_range(0..PROCESSES));
            let fails = u32::from(rng.gen_bool(0.25));
            let ms = if rng.gen_ratio(1, 6) {
                rng.gen_range(2_000..=4_000)
            } else {
                rng.gen_range(200..=800)
            };
            work.spawn_keyed(p, fails, ms, key.clone());
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..=1_300))).await;
    }
}

/// Requests with queue keys: bursts of one to three requests with one key of one
/// process (`q<i>`, keys `k<j>`), 0–150 ms apart, so that later ones meet the first
/// while it is still queued.
async fn queue_keyed(work: Arc<Work>, mut rng: ChaCha8Rng) {
    while now_ms() < work.stop_ms {
        let p = format!("q{}", rng.gen_range(0..QUEUE_PROCESSES));
        let key = format!("k{}", rng.gen_range(0..QUEUE_KEYS));
        for _ in 0..rng.gen_range(1..=3) {
            work.spawn_queued(p.clone(), key.clone(), rng.gen_range(0..=100));
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=150))).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..=700))).await;
    }
}

/// Pauses `wp<k>`, schedules six jobs into it, cancels two of them, resumes it after
/// 8–12 s. Meanwhile requests with the queue key [`PAUSED_KEY`]: the first is queued
/// (and holds the key until the resume), the later ones are refused.
async fn pause_episode(work: Arc<Work>, k: usize, mut rng: ChaCha8Rng) {
    let process = format!("wp{k}");
    let acked_ms = work
        .control(&worker::control::pause_key(GROUP, Some(&process)), true)
        .await;
    for i in 0..4u64 {
        let (w, p) = (Arc::clone(&work), process.clone());
        let at = acked_ms + 200 + i * rng.gen_range(1_500..=2_500);
        work.tracker.spawn(async move {
            tokio::time::sleep(Duration::from_millis(at.saturating_sub(wall_ms()))).await;
            w.schedule_queued(&p, PAUSED_KEY, 0).await;
        });
    }
    let mut slots = Vec::new();
    for _ in 0..6 {
        let (fails, _) = kind(&mut rng);
        if let Some(s) = work.schedule(&process, fails.min(1), 100).await {
            slots.push(s);
        }
    }
    slots.shuffle(&mut rng);
    for slot in slots.into_iter().take(2) {
        let acked_ms = work
            .control(&worker::control::cancel_key(GROUP, &process, slot), true)
            .await;
        if let Ok(mut c) = work.cancels.lock() {
            c.push(Cancel {
                job: format!("{process}:{slot}"),
                acked_ms,
                queued: true,
            });
        }
    }
    let hold = rng.gen_range(8_000..=12_000);
    tokio::time::sleep(Duration::from_millis(
        (acked_ms + hold).saturating_sub(wall_ms()),
    ))
    .await;
    let resumed_ms = wall_ms();
    work.control(&worker::control::pause_key(GROUP, Some(&process)), false)
        .await;
    if let Ok(mut p) = work.pauses.lock() {
        p.push(Pause {
            process,
            acked_ms,
            resumed_ms,
        });
    }
}

/// Schedules a 3 s job into `wl<k>`, waits until it starts, cancels it.
async fn cancel_running(work: Arc<Work>, k: usize) {
    let process = format!("wl{k}");
    let Some(slot) = work.schedule(&process, 0, 3_000).await else {
        return;
    };
    let job = format!("{process}:{slot}");
    let deadline = now_ms() + 20_000;
    while now_ms() < deadline {
        let started = read_runs(&work.out)
            .get(&job)
            .is_some_and(|r| !r.is_empty());
        if started {
            let acked_ms = work
                .control(&worker::control::cancel_key(GROUP, &process, slot), true)
                .await;
            if let Ok(mut c) = work.cancels.lock() {
                c.push(Cancel {
                    job,
                    acked_ms,
                    queued: false,
                });
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn workload(work: Arc<Work>, seed: u64, duration_ms: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(STREAM_JOBS);
    let started = now_ms();
    let steady_task = tokio::spawn(steady(
        Arc::clone(&work),
        ChaCha8Rng::seed_from_u64(rng.gen()),
    ));
    let exec_task = tokio::spawn(exec_keyed(
        Arc::clone(&work),
        ChaCha8Rng::seed_from_u64(rng.gen()),
    ));
    let queue_task = tokio::spawn(queue_keyed(
        Arc::clone(&work),
        ChaCha8Rng::seed_from_u64(rng.gen()),
    ));
    // Pauses: one early, one half-way (if the run is long enough for it).
    let mut episodes = Vec::new();
    for (k, at) in [(0, 6_000), (1, duration_ms / 2)] {
        if at + 14_000 > duration_ms {
            continue;
        }
        let w = Arc::clone(&work);
        let r = ChaCha8Rng::seed_from_u64(rng.gen());
        episodes.push(tokio::spawn(async move {
            sleep_ms_until(started + at).await;
            pause_episode(w, k, r).await;
        }));
    }
    // A running job cancelled every 8–15 s.
    let mut at = 5_000;
    let mut k = 0;
    while at + 5_000 < duration_ms {
        let w = Arc::clone(&work);
        episodes.push(tokio::spawn(async move {
            sleep_ms_until(started + at).await;
            cancel_running(w, k).await;
        }));
        at += rng.gen_range(8_000..=15_000);
        k += 1;
    }
    let _ = steady_task.await;
    let _ = exec_task.await;
    let _ = queue_task.await;
    for e in episodes {
        let _ = e.await;
    }
}

async fn sleep_ms_until(at: u64) {
    tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await;
}

/// One run of a job's handler, from its file.
#[derive(Debug, Clone)]
struct Run {
    pid: String,
    start_ms: u64,
    /// `Some((true, ms))`: failed at ms; `Some((false, ms))`: ended; `None`: cut.
    end: Option<(bool, u64)>,
    /// The handler's parent: the instance that ran it.
    ppid: Option<u32>,
    /// Its execution key and fencing token, as the handler's environment said.
    key: Option<String>,
    token: Option<u64>,
}

/// Every run of every job, by job, in the order they started.
fn read_runs(out: &Path) -> BTreeMap<String, Vec<Run>> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let mut runs: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let [what, job, pid, ms, ..] = f.as_slice() else {
            continue;
        };
        let Ok(ms) = ms.parse::<u64>() else {
            continue;
        };
        let list = runs.entry(job.to_string()).or_default();
        let field = |i: usize| f.get(i).filter(|v| **v != "-" && !v.is_empty());
        match *what {
            "start" => list.push(Run {
                pid: pid.to_string(),
                start_ms: ms,
                end: None,
                ppid: field(4).and_then(|v| v.parse().ok()),
                key: field(5).map(|v| v.to_string()),
                token: field(6).and_then(|v| v.parse().ok()),
            }),
            "fail" | "end" => {
                if let Some(r) = list.iter_mut().rev().find(|r| r.pid == *pid) {
                    r.end = Some((*what == "fail", ms));
                }
            }
            _ => {}
        }
    }
    for list in runs.values_mut() {
        list.sort_by_key(|r| r.start_ms);
    }
    runs
}

/// The instance that feeds the group now: the running one whose log says last (since
/// its latest start) that it feeds. Without one, the first instance (noted).
pub(super) fn feeder(rig: &mut Rig, notes: &mut Vec<String>) -> usize {
    let mut best: Option<(String, usize)> = None;
    for (w, member) in rig.workers.iter().enumerate() {
        if member.process.is_none() {
            continue;
        }
        let text = std::fs::read_to_string(&member.log).unwrap_or_default();
        let since = text
            .rfind("=== chaos: worker")
            .map_or(text.as_str(), |i| &text[i..]);
        if let Some(line) = since
            .lines()
            .rfind(|l| l.contains("this instance feeds the group"))
        {
            let at = line.split(' ').next().unwrap_or_default().to_string();
            if best.as_ref().is_none_or(|(b, _)| at > *b) {
                best = Some((at, w));
            }
        }
    }
    match best {
        Some((_, w)) => w,
        None => {
            notes.push("no instance says it feeds; the first one hit".to_string());
            0
        }
    }
}

/// What the worker scenario counted.
#[derive(Debug, Default, Clone, Serialize)]
pub(super) struct Verdict {
    jobs: usize,
    requests: usize,
    finals: BTreeMap<String, usize>,
    not_final: usize,
    handler_runs: usize,
    failed_runs: usize,
    cut_runs: usize,
    retries: usize,
    /// Runs after the first that were not retries of a failure, by the fault that
    /// explains them.
    reruns: BTreeMap<String, usize>,
    /// Jobs meant to end `done` that ended `dead`: handed back often enough (kills,
    /// stops, expiries) that a failure met the last attempt.
    dead_by_redelivery: usize,
    pauses: Vec<Pause>,
    /// From a job's assignment to its first recorded start (paused processes aside),
    /// ms: how long faults kept jobs waiting.
    start_p50_ms: u64,
    start_p99_ms: u64,
    start_max_ms: u64,
    cancels: usize,
    cancels_queued: usize,
    instance_starts: usize,
    /// Execution keys: runs of keyed jobs, those cut short (no end line) and how their
    /// end was bounded, those whose end could not be, overlaps, tokens that did not
    /// grow, leases lost (and of those, with no server fault around them).
    key_runs: usize,
    key_runs_cut: usize,
    key_cut_ends: BTreeMap<String, usize>,
    key_unbounded: usize,
    key_overlaps: usize,
    key_tokens_not_growing: usize,
    key_leases_lost: usize,
    key_leases_lost_without_fault: usize,
    /// Queue keys: requests, receipts, `queue_key_held` refusals (explained by a queued
    /// job, attributed to a fault window, violations), jobs accepted while another of
    /// their key was queued (attributed, violations), holds left after settling.
    queue_requests: usize,
    queue_receipts: usize,
    queue_refusals: usize,
    queue_refusals_explained: usize,
    queue_refusals_attributed: BTreeMap<String, usize>,
    queue_refusal_violations: usize,
    queue_both_queued: usize,
    queue_both_queued_attributed: BTreeMap<String, usize>,
    holds_left: usize,
    holds_left_attributed: BTreeMap<String, usize>,
    holds_left_violations: usize,
    /// What was attributed rather than failed, and runs left unbounded, one line each.
    notes: Vec<String>,
}

/// Which fault kinds explain a run again: they cut a run, or keep its result from being
/// recorded.
fn explains_rerun(f: &Fault) -> bool {
    matches!(
        f,
        Fault::WorkerKill { .. } | Fault::FeederKill { .. } | Fault::NatsKill { .. }
    )
}

#[allow(clippy::too_many_arguments)]
fn judge(
    log: &BTreeMap<String, ProcessLog>,
    results: &tests::support::JobResults,
    runs: &BTreeMap<String, Vec<Run>>,
    sent: &[Sent],
    pauses: &[Pause],
    cancels: &[Cancel],
    faults: &[FaultRecord],
    ev: &Evidence<'_>,
    v: &mut Verdict,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let fails_of: HashMap<&str, u32> = sent.iter().map(|s| (s.id.as_str(), s.fails)).collect();
    let cancelled: HashMap<&str, &Cancel> = cancels.iter().map(|c| (c.job.as_str(), c)).collect();
    // Faults as wall-clock windows (the injector keeps run-relative ms).
    let offset = wall_ms().saturating_sub(now_ms());
    let windows: Vec<(u64, u64, &'static str, bool)> = faults
        .iter()
        .map(|f| {
            (
                f.start_ms + offset,
                f.end_ms + offset,
                f.fault.name(),
                explains_rerun(&f.fault),
            )
        })
        .collect();
    for sub in &results.faults {
        out.push(violation("foreign", format!("a fault event on {sub}")));
    }
    let by_key = keyed_runs(log, results, runs, ev, v, &mut out);
    let mut lost_by_job: HashMap<&str, Vec<u64>> = HashMap::new();
    for k in by_key.values().flatten().filter(|k| k.lease_lost) {
        lost_by_job
            .entry(k.job.as_str())
            .or_default()
            .push(k.run.start_ms);
        // A lease is lost when renewals fail for lease − lease/5: the server stalled
        // or down. Without such a fault around it (a loaded machine starving the
        // instance) it is counted, not failed: it costs a retry, never safety.
        let to = k.end_ms.unwrap_or(k.run.start_ms);
        let by_server = windows.iter().any(|(s, e, n, _)| {
            matches!(*n, "nats_stall" | "nats_kill")
                && *s <= to
                && *e + EXEC_KEY_LEASE_MS >= k.run.start_ms
        });
        if !by_server {
            v.key_leases_lost_without_fault += 1;
            v.notes.push(format!(
                "{} (started {}, token {:?}): execution key lease lost with no server fault around it",
                k.job, k.run.start_ms, k.run.token
            ));
        }
    }
    judge_exec_keys(&by_key, v, &mut out);
    judge_queue_keys(log, results, runs, ev, &windows, v, &mut out);
    let mut jobs = BTreeSet::new();
    for (process, plog) in log {
        for e in &plog.entries {
            let job = format!("{process}:{}", e.slot);
            jobs.insert(job.clone());
            let evs: &[ResultEvent] = results.jobs.get(&job).map_or(&[], |v| v.as_slice());
            let job_runs: &[Run] = runs.get(&job).map_or(&[], |v| v.as_slice());
            let fails = fails_of.get(e.message_id.as_str()).copied();
            judge_job(
                &job,
                fails,
                evs,
                job_runs,
                lost_by_job.get(job.as_str()).map_or(&[], |l| l.as_slice()),
                cancelled.get(job.as_str()).copied(),
                &windows,
                v,
                &mut out,
            );
        }
    }
    v.jobs = jobs.len();
    let paused: BTreeSet<&str> = pauses.iter().map(|p| p.process.as_str()).collect();
    let mut waits: Vec<u64> = results
        .jobs
        .iter()
        .filter(|(job, _)| job.split_once(':').is_none_or(|(p, _)| !paused.contains(p)))
        .filter_map(|(_, evs)| {
            let e = evs.iter().find(|e| e.started_ms.is_some())?;
            Some(e.started_ms?.saturating_sub(e.scheduled_ms))
        })
        .collect();
    waits.sort_unstable();
    let at = |q: f64| {
        waits
            .get(((waits.len() as f64 * q) as usize).min(waits.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    v.start_p50_ms = at(0.5);
    v.start_p99_ms = at(0.99);
    v.start_max_ms = waits.last().copied().unwrap_or(0);
    for job in results.jobs.keys() {
        if !jobs.contains(job) {
            out.push(violation(
                "results",
                format!("{job}: events for a job the log does not hold"),
            ));
        }
    }
    for job in runs.keys() {
        if !jobs.contains(job) {
            out.push(violation(
                "handler",
                format!("{job}: ran, but the log does not hold it"),
            ));
        }
    }
    // Pauses.
    for p in pauses {
        let prefix = format!("{}:", p.process);
        for (job, rs) in runs.range(prefix.clone()..) {
            if !job.starts_with(&prefix) {
                break;
            }
            for r in rs {
                if r.start_ms > p.acked_ms + GRACE_MS && r.start_ms < p.resumed_ms {
                    out.push(violation(
                        "pause",
                        format!(
                            "{job} started at {} while {} was paused ({} .. {})",
                            r.start_ms, p.process, p.acked_ms, p.resumed_ms
                        ),
                    ));
                }
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn judge_job(
    job: &str,
    fails: Option<u32>,
    evs: &[ResultEvent],
    runs: &[Run],
    lost: &[u64],
    cancel: Option<&Cancel>,
    windows: &[(u64, u64, &'static str, bool)],
    v: &mut Verdict,
    out: &mut Vec<Violation>,
) {
    let finals: Vec<&ResultEvent> = evs.iter().filter(|e| e.state.is_final()).collect();
    let states = || {
        evs.iter()
            .map(|e| format!("{:?}@{}", e.state, e.attempt))
            .collect::<Vec<_>>()
            .join(",")
    };
    match finals.as_slice() {
        [] => {
            v.not_final += 1;
            out.push(violation(
                "final",
                format!("{job}: no final event ({})", states()),
            ));
        }
        [f] => {
            *v.finals
                .entry(format!("{:?}", f.state).to_lowercase())
                .or_default() += 1
        }
        _ => out.push(violation(
            "final",
            format!("{job}: {} final events ({})", finals.len(), states()),
        )),
    }
    if let Some(i) = evs.iter().position(|e| e.state.is_final()) {
        if i + 1 != evs.len() {
            out.push(violation(
                "final",
                format!("{job}: events after its final one ({})", states()),
            ));
        }
    }
    let Some(fails) = fails else {
        out.push(violation(
            "log",
            format!("{job}: a message id the workload never sent"),
        ));
        return;
    };
    v.handler_runs += runs.len();
    // Runs: retries, reruns (explained or not), overlaps.
    for (i, r) in runs.iter().enumerate() {
        match r.end {
            Some((true, _)) => v.failed_runs += 1,
            None => v.cut_runs += 1,
            _ => {}
        }
        if i == 0 {
            continue;
        }
        let prev = &runs[i - 1];
        if let Some((_, end)) = prev.end {
            if end > r.start_ms {
                out.push(violation(
                    "overlap",
                    format!(
                        "{job}: run {} started at {} while run {} (pid {}) ran until {end}",
                        i + 1,
                        r.start_ms,
                        i,
                        prev.pid
                    ),
                ));
            }
        }
        if matches!(prev.end, Some((true, _))) {
            v.retries += 1;
            continue;
        }
        // Its execution key's lease was lost while it ran: recorded failed, retried.
        if lost.contains(&prev.start_ms) {
            *v.reruns.entry("key_lease_lost".into()).or_default() += 1;
            continue;
        }
        let by: Vec<(&str, bool)> = windows
            .iter()
            .filter(|(s, e, _, _)| *s <= r.start_ms && *e >= prev.start_ms)
            .map(|(_, _, n, ok)| (*n, *ok))
            .collect();
        match by.iter().find(|(_, ok)| *ok) {
            Some((name, _)) => *v.reruns.entry(name.to_string()).or_default() += 1,
            None => {
                *v.reruns.entry("unexplained".into()).or_default() += 1;
                out.push(violation(
                    "rerun",
                    format!(
                        "{job}: run {} at {} after run {} at {} ({}) with no instance or server killed between{} ({})",
                        i + 1,
                        r.start_ms,
                        i,
                        prev.start_ms,
                        if prev.end.is_some() { "finished" } else { "cut" },
                        if by.is_empty() { String::new() } else { format!("; only {:?}", by.iter().map(|b| b.0).collect::<Vec<_>>()) },
                        states()
                    ),
                ));
            }
        }
    }
    // Policy.
    let mut last_attempt = 0;
    for e in evs {
        if e.attempt <= last_attempt && e.state != State::Cancelled {
            out.push(violation(
                "policy",
                format!(
                    "{job}: attempt {} after {last_attempt} ({})",
                    e.attempt,
                    states()
                ),
            ));
        }
        last_attempt = last_attempt.max(e.attempt);
        match e.state {
            State::Failed if e.attempt >= MAX_ATTEMPTS => out.push(violation(
                "policy",
                format!(
                    "{job}: failed at attempt {} of {MAX_ATTEMPTS}, not dead ({})",
                    e.attempt,
                    states()
                ),
            )),
            State::Dead if e.attempt < MAX_ATTEMPTS => out.push(violation(
                "policy",
                format!(
                    "{job}: dead at attempt {} of {MAX_ATTEMPTS} ({})",
                    e.attempt,
                    states()
                ),
            )),
            _ => {}
        }
        if e.state == State::Failed {
            let delay = worker::job::backoff(e.attempt, BACKOFF_MS, BACKOFF_MAX_MS);
            if let Some(next) = runs.iter().find(|r| r.start_ms > e.at_ms) {
                if next.start_ms + BACKOFF_SLACK_MS < e.at_ms + delay {
                    out.push(violation(
                        "policy",
                        format!("{job}: retried at {} after attempt {} failed at {}: sooner than its backoff {delay} ms", next.start_ms, e.attempt, e.at_ms),
                    ));
                }
            }
        }
    }
    let recorded_failures = evs
        .iter()
        .filter(|e| matches!(e.state, State::Failed | State::Dead) && e.started_ms.is_some())
        .count();
    // A run whose execution key's lease was lost is recorded failed whatever its
    // handler did.
    let failing_runs = runs
        .iter()
        .filter(|r| matches!(r.end, Some((true, _))) || lost.contains(&r.start_ms))
        .count();
    if recorded_failures > failing_runs {
        out.push(violation(
            "policy",
            format!(
                "{job}: {recorded_failures} failures recorded, {failing_runs} failing runs ({})",
                states()
            ),
        ));
    }
    let last = finals.last().map(|f| f.state);
    // Cancels.
    if let Some(c) = cancel {
        if c.queued && !runs.is_empty() {
            out.push(violation(
                "cancel",
                format!(
                    "{job}: cancelled while queued in a paused process at {}, yet ran at {}",
                    c.acked_ms, runs[0].start_ms
                ),
            ));
        }
        if let Some(r) = runs.iter().find(|r| r.start_ms > c.acked_ms + GRACE_MS) {
            out.push(violation(
                "cancel",
                format!(
                    "{job}: started at {} after its cancel at {}",
                    r.start_ms, c.acked_ms
                ),
            ));
        }
        match last {
            Some(State::Cancelled) | None => {}
            Some(State::Done) => {
                let ended = runs.iter().filter_map(|r| r.end).map(|(_, ms)| ms).max();
                if ended.is_none_or(|ms| ms > c.acked_ms + GRACE_MS) {
                    out.push(violation(
                        "cancel",
                        format!(
                            "{job}: done though cancelled at {} ({})",
                            c.acked_ms,
                            states()
                        ),
                    ));
                }
            }
            Some(s) => {
                if fails != ALWAYS || s != State::Dead {
                    out.push(violation(
                        "cancel",
                        format!("{job}: ended {s:?} though cancelled at {}", c.acked_ms),
                    ));
                }
            }
        }
        return;
    }
    match last {
        Some(State::Cancelled) => out.push(violation(
            "cancel",
            format!("{job}: cancelled, but nobody cancelled it ({})", states()),
        )),
        Some(State::Merged) => out.push(violation(
            "final",
            format!("{job}: merged in a queue buffer ({})", states()),
        )),
        Some(State::Done) => {
            if fails == ALWAYS {
                out.push(violation(
                    "policy",
                    format!("{job}: done, but its handler always fails ({})", states()),
                ));
            }
            // The run that recorded it: the first to start at or after its attempt
            // started (a later run, handed out again, may have been cut).
            let done = finals
                .last()
                .and_then(|f| f.started_ms)
                .and_then(|s| runs.iter().find(|r| r.start_ms >= s))
                .or(runs.last());
            match done {
                Some(Run {
                    end: Some((false, _)),
                    ..
                }) => {}
                _ => out.push(violation(
                    "handler",
                    format!(
                        "{job}: done, but the run that recorded it did not end ({})",
                        states()
                    ),
                )),
            }
        }
        Some(State::Dead) if fails != ALWAYS => v.dead_by_redelivery += 1,
        _ => {}
    }
}

pub(super) async fn run(args: &Args, seed: u64) -> Result<Outcome> {
    let kinds = fault_kinds(args.cluster, Scenario::Workers, &args.faults)?;
    if args.instances < 2 {
        bail!("--instances: at least 2 (a killed instance's jobs need another)");
    }
    let files = tempfile::Builder::new()
        .prefix("turnstile-chaos-jobs-")
        .tempdir()?;
    let out = files.path().join("jobs.txt");
    let flags: Vec<String> = [
        "--lease-ms".to_string(),
        "2000".into(),
        "--max-attempts".into(),
        MAX_ATTEMPTS.to_string(),
        "--backoff-ms".into(),
        BACKOFF_MS.to_string(),
        "--backoff-max-ms".into(),
        BACKOFF_MAX_MS.to_string(),
        "--ack-wait-ms".into(),
        ACK_WAIT_MS.to_string(),
        "--concurrency".into(),
        "8".into(),
        "--exec-key-lease-ms".into(),
        EXEC_KEY_LEASE_MS.to_string(),
    ]
    .to_vec();
    let spec = WorkerSpec {
        group: GROUP.to_string(),
        script: script(&out),
        flags,
        instances: args.instances,
    };
    let Setup {
        rig,
        work: dir,
        ping,
        client_url,
        operator_url,
        nats_logs,
    } = setup(args, 0, Some(spec)).await?;
    let limits = Limits::fetch(&ping).await?;
    println!(
        "chaos: {} worker instances (group {GROUP}) and {} replicas on {}; jobs in {}",
        args.instances,
        args.replicas,
        rig.nats.describe(),
        out.display()
    );
    let operator = connect(&operator_url).await?;
    let js = async_nats::jetstream::new(operator);
    let kv = js
        .get_key_value(Subjects::default().workers_bucket())
        .await?;
    let duration_ms = args.duration * 1000;
    let started = now_ms();
    let stop_ms = started + duration_ms;
    let work = Arc::new(Work {
        client: Client::new(connect(&client_url).await?, Subjects::default())
            .with_timeout(REQUEST_TIMEOUT),
        kv,
        out: out.clone(),
        sent: Mutex::new(Vec::new()),
        queued: Mutex::new(Vec::new()),
        pauses: Mutex::new(Vec::new()),
        cancels: Mutex::new(Vec::new()),
        next: AtomicUsize::new(0),
        tracker: TaskTracker::new(),
        stop_ms,
    });
    let workload_task = tokio::spawn(workload(Arc::clone(&work), seed, duration_ms));
    let plan = if args.no_faults {
        Vec::new()
    } else {
        plan_faults(seed, args.replicas, 0, args.instances, &kinds)
    };
    let rt = tokio::runtime::Handle::current();
    let last_start = stop_ms.saturating_sub(15_000);
    let injector =
        tokio::task::spawn_blocking(move || inject(rig, rt, plan, started + 5_000, last_start));
    workload_task.await?;
    let (mut rig, faults, injected) = injector.await?;
    let injector_error = injected.err().map(|e| format!("{e:#}"));
    work.tracker.close();
    work.tracker.wait().await;
    rig.check_alive()?;
    println!(
        "[{:>6} s] workload done; reading the log; up to {} s for every job to end",
        secs(now_ms()),
        args.settle
    );
    let (logs, mut violations) = read_all(&operator_url).await?;
    let total: usize = logs.values().map(|l| l.entries.len()).sum();
    let deadline = now_ms() + args.settle * 1000;
    let results = loop {
        let r = job_results(&js, GROUP).await?;
        let finals = r
            .jobs
            .values()
            .filter(|evs| evs.iter().any(|e| e.state.is_final()))
            .count();
        if finals >= total || now_ms() > deadline {
            println!("[{:>6} s] {finals} of {total} jobs final", secs(now_ms()));
            break r;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    if let Err(e) = wait_for_service(&ping, WORKER_SERVICE, args.instances).await {
        rig.violations.push(violation(
            "worker",
            format!("after the workload: {e} (at {} s)", secs(now_ms())),
        ));
    }
    let holds = match holds_left(&js).await {
        Ok(h) => h,
        Err(e) => {
            rig.violations.push(violation(
                "queue_key",
                format!("reading the queue-keys bucket after settling: {e:#}"),
            ));
            Vec::new()
        }
    };
    let runs = read_runs(&out);
    let instance_logs: Vec<PathBuf> = rig.workers.iter().map(|w| w.log.clone()).collect();
    let lost = instance_lines(&instance_logs, "was lost while it ran");
    let not_released = instance_lines(&instance_logs, "queue key not released");
    let offset = wall_ms().saturating_sub(now_ms());
    let exits: Vec<(u32, u64)> = rig
        .worker_exits
        .iter()
        .map(|(pid, at)| (*pid, at + offset))
        .collect();
    let queued = work
        .queued
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let sent = work
        .sent
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let pauses = work
        .pauses
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let cancels = work
        .cancels
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut verdict = Verdict {
        requests: sent.len(),
        cancels: cancels.len(),
        cancels_queued: cancels.iter().filter(|c| c.queued).count(),
        instance_starts: rig.workers.iter().map(|w| w.starts).sum(),
        ..Verdict::default()
    };
    violations.extend(judge(
        &logs,
        &results,
        &runs,
        &sent,
        &pauses,
        &cancels,
        &faults,
        &Evidence {
            exits: &exits,
            lost: &lost,
            not_released: &not_released,
            queued: &queued,
            holds: &holds,
        },
        &mut verdict,
    ));
    for n in &verdict.notes {
        println!("  note: {n}");
    }
    verdict.pauses = pauses;
    let counts = Counts {
        assignments: total,
        processes: logs.len(),
        ..Counts::default()
    };
    rig.stop_all();
    let mut all = std::mem::take(&mut rig.violations);
    all.extend(violations);
    let mut logs: Vec<PathBuf> = rig
        .replicas
        .iter()
        .chain(&rig.workers)
        .map(|r| r.log.clone())
        .collect();
    logs.push(out.clone());
    let outcome = Outcome {
        seed,
        counts,
        faults,
        events: Vec::new(),
        violations: all,
        verify: json!({"ok": true, "skipped": "the worker scenario does not run turnstile verify"}),
        limits,
        elapsed_ms: now_ms() - started,
        logs: logs.clone(),
        nats_logs: nats_logs.clone(),
        injector_error,
        alarms: None,
        workers: Some(verdict),
    };
    if !outcome.violations.is_empty() || outcome.injector_error.is_some() {
        keep_logs(seed, &logs, &nats_logs);
    }
    drop(rig);
    drop(dir);
    drop(files);
    Ok(outcome)
}

/// The summary's rows for a worker run.
pub(super) fn summary(args: &Args, o: &Outcome, w: &Verdict) -> Vec<(&'static str, String)> {
    let join = |m: &BTreeMap<String, usize>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mut faults: BTreeMap<String, usize> = BTreeMap::new();
    for f in &o.faults {
        *faults.entry(f.fault.name().to_string()).or_default() += 1;
    }
    vec![
        (
            "seed",
            format!("{} (replay: {})", o.seed, replay(args, o.seed)),
        ),
        (
            "ran",
            format!(
                "{} s, {} worker instances ({} starts), {} replicas, one nats-server, {} build",
                secs(o.elapsed_ms),
                args.instances,
                w.instance_starts,
                args.replicas,
                profile()
            ),
        ),
        (
            "jobs",
            format!(
                "{} in the log of {} processes ({} requests); final: {}; not final {}",
                w.jobs,
                o.counts.processes,
                w.requests,
                join(&w.finals),
                w.not_final
            ),
        ),
        (
            "handler",
            format!(
                "{} runs ({} failed, {} cut), {} retries; runs again: {}; dead by redelivery {}",
                w.handler_runs,
                w.failed_runs,
                w.cut_runs,
                w.retries,
                join(&w.reruns),
                w.dead_by_redelivery
            ),
        ),
        (
            "to start",
            format!(
                "p50 {} ms, p99 {} ms, max {} ms (assignment to first start)",
                w.start_p50_ms, w.start_p99_ms, w.start_max_ms
            ),
        ),
        (
            "control",
            format!(
                "{} pauses, {} cancels ({} while queued)",
                w.pauses.len(),
                w.cancels,
                w.cancels_queued
            ),
        ),
        (
            "exec keys",
            format!(
                "{} keyed runs, {} cut (ends from: {}; unbounded {}), {} leases lost ({} with no server fault), overlaps {}, tokens not growing {}",
                w.key_runs,
                w.key_runs_cut,
                join(&w.key_cut_ends),
                w.key_unbounded,
                w.key_leases_lost,
                w.key_leases_lost_without_fault,
                w.key_overlaps,
                w.key_tokens_not_growing
            ),
        ),
        (
            "queue keys",
            format!(
                "{} requests, {} receipts, {} refusals (explained {}, attributed: {}, violations {}); accepted while another queued: {} (attributed: {}); holds left {} (attributed: {}, violations {})",
                w.queue_requests,
                w.queue_receipts,
                w.queue_refusals,
                w.queue_refusals_explained,
                join(&w.queue_refusals_attributed),
                w.queue_refusal_violations,
                w.queue_both_queued,
                join(&w.queue_both_queued_attributed),
                w.holds_left,
                join(&w.holds_left_attributed),
                w.holds_left_violations
            ),
        ),
        ("faults", format!("{} ({})", o.faults.len(), join(&faults))),
        ("violations", o.violations.len().to_string()),
    ]
}

// ---------------------------------------------------------------------------------
// Execution keys and queue keys

/// A line of an instance's log: when (wall ms, from its timestamp) and the line.
#[derive(Debug, Clone)]
struct LogLine {
    at_ms: u64,
    text: String,
}

/// `2026-12-02T11:30:37.123456Z` (tracing's UTC timestamp) as ms since the epoch.
fn parse_utc_ms(s: &str) -> Option<u64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let ms: i64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms).ok()
}

/// The lines of the instances' logs that contain `needle`, with their times.
fn instance_lines(logs: &[PathBuf], needle: &str) -> Vec<LogLine> {
    let mut out = Vec::new();
    for path in logs {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains(needle)) {
            // Without the terminal's colour codes.
            let mut plain = String::with_capacity(line.len());
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    plain.push(c);
                }
            }
            let Some(at_ms) = plain.split_whitespace().next().and_then(parse_utc_ms) else {
                continue;
            };
            out.push(LogLine { at_ms, text: plain });
        }
    }
    out
}

/// Whether `text` has `what` (which starts with a job id) where no longer process name
/// could (`p1:5: ...` is not `wp1:5: ...`).
fn mentions(text: &str, what: &str) -> bool {
    text.match_indices(what).any(|(i, _)| {
        text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '-' && c != '_')
    })
}

/// The first value of header `name` of a log entry (names compared ASCII-case-blind).
fn header<'a>(e: &'a EntrySum, name: &str) -> Option<&'a str> {
    e.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// What the oracle has besides the log, the results and the handler's runs.
struct Evidence<'a> {
    /// Worker instances the injector ended: pid, when reaped (wall ms).
    exits: &'a [(u32, u64)],
    /// The instances' "the lease (token T) was lost while it ran" lines.
    lost: &'a [LogLine],
    /// The instances' "queue key not released" lines.
    not_released: &'a [LogLine],
    /// Every queue-keyed request and its answers.
    queued: &'a [Queued],
    /// The holds left in the queue-keys bucket after settling: key, hold, revision.
    holds: &'a [(String, Hold, u64)],
}

/// A run of a job with an execution key, with the latest its handler can have run.
struct KeyedRun<'a> {
    job: String,
    run: &'a Run,
    /// The run's end: its `end`/`fail` line, or for a run cut short the earliest of
    /// its attempt's result (started + duration: the handler had returned, its child
    /// reaped, before the key was let go), its instance's exit (the child dies with
    /// it), and the instance's "lease lost" line (written after the child was reaped).
    end_ms: Option<u64>,
    /// Whether its instance says its lease was lost while it ran.
    lease_lost: bool,
}

/// The runs of every job with an execution key, by key; each end bounded (see
/// [`KeyedRun`]).
fn keyed_runs<'a>(
    log: &BTreeMap<String, ProcessLog>,
    results: &tests::support::JobResults,
    runs: &'a BTreeMap<String, Vec<Run>>,
    ev: &Evidence<'_>,
    v: &mut Verdict,
    out: &mut Vec<Violation>,
) -> BTreeMap<String, Vec<KeyedRun<'a>>> {
    let mut by_key: BTreeMap<String, Vec<KeyedRun<'a>>> = BTreeMap::new();
    for (process, plog) in log {
        for e in &plog.entries {
            let Some(key) = header(e, journal::subjects::EXECUTION_KEY) else {
                continue;
            };
            let job = format!("{process}:{}", e.slot);
            let Some(job_runs) = runs.get(&job) else {
                continue;
            };
            let events: &[ResultEvent] = results.jobs.get(&job).map_or(&[], |x| x.as_slice());
            // Each attempt that ran is the first run to start at or after its start.
            let mut by_event: HashMap<usize, (u64, bool)> = HashMap::new();
            for e in events {
                let (Some(s), Some(d)) = (e.started_ms, e.duration_ms) else {
                    continue;
                };
                if let Some(i) = job_runs.iter().position(|r| r.start_ms >= s) {
                    let lost = e
                        .reason
                        .as_deref()
                        .is_some_and(|r| r.contains("was lost while it ran"));
                    // Rounding: both ms counts are truncated.
                    by_event.insert(i, (s + d + 2, lost));
                }
            }
            for (i, r) in job_runs.iter().enumerate() {
                v.key_runs += 1;
                if r.key.as_deref() != Some(key) {
                    out.push(violation(
                        "exec_key",
                        format!(
                            "{job}: run {} had execution key {:?} in its environment, its entry {key:?}",
                            i + 1,
                            r.key
                        ),
                    ));
                }
                let lost_line = r.token.and_then(|t| {
                    let what = format!("{job}: execution key");
                    let token = format!("(token {t})");
                    ev.lost
                        .iter()
                        .filter(|l| {
                            l.at_ms >= r.start_ms
                                && mentions(&l.text, &what)
                                && l.text.contains(&token)
                        })
                        .map(|l| l.at_ms)
                        .min()
                });
                let event = by_event.get(&i).filter(|(end, _)| *end >= r.start_ms);
                let lease_lost = lost_line.is_some() || event.is_some_and(|(_, lost)| *lost);
                if lease_lost {
                    v.key_leases_lost += 1;
                }
                let end_ms = match r.end {
                    Some((_, ms)) => Some(ms),
                    None => {
                        v.key_runs_cut += 1;
                        let exit = ev
                            .exits
                            .iter()
                            .filter(|(pid, at)| Some(*pid) == r.ppid && *at >= r.start_ms)
                            .map(|(_, at)| *at)
                            .min();
                        let bounds = [
                            ("result", event.map(|(end, _)| *end)),
                            ("instance exit", exit),
                            ("lease-lost line", lost_line),
                        ];
                        let best = bounds.iter().filter_map(|(n, b)| b.map(|b| (b, *n))).min();
                        match best {
                            Some((b, how)) => {
                                *v.key_cut_ends.entry(how.to_string()).or_default() += 1;
                                Some(b)
                            }
                            None => {
                                // Cut, yet no result of its attempt, no exit of its
                                // instance and no lease-lost line: the instance lived on
                                // and recorded nothing of the attempt (its result's write
                                // failed and the job was handed back). How long its child
                                // ran is then not known here: counted and printed, and
                                // left out of the overlap check.
                                v.key_unbounded += 1;
                                v.notes.push(format!(
                                    "execution key {key:?}: {job} run {} (pid {}, started {}) cut with no bound on its end",
                                    i + 1,
                                    r.pid,
                                    r.start_ms
                                ));
                                None
                            }
                        }
                    }
                };
                by_key.entry(key.to_string()).or_default().push(KeyedRun {
                    job: job.clone(),
                    run: r,
                    end_ms,
                    lease_lost,
                });
            }
        }
    }
    by_key
}

/// Execution keys: no two runs with one key at once, and the fencing token grows from
/// each holder to the next.
///
/// Which overlaps the design allows: a holder that cannot renew gives the key up at
/// its local deadline (send time of its last acknowledged renewal + lease − lease/5)
/// and kills its child then, before the server (counting from the later store time)
/// frees the key; a dead instance's children die with it. Only a holder that cannot
/// act on its deadline — its instance stalled (SIGSTOP) or starved past the lease/5
/// margin — can run on after the key was freed. No fault here stalls an instance
/// (they are killed or stopped), and a stalled or killed server only makes holders
/// give up early; so every overlap is a violation.
fn judge_exec_keys(
    by_key: &BTreeMap<String, Vec<KeyedRun<'_>>>,
    v: &mut Verdict,
    out: &mut Vec<Violation>,
) {
    for (key, list) in by_key {
        let mut list: Vec<&KeyedRun> = list.iter().collect();
        list.sort_by_key(|k| k.run.start_ms);
        // The run with the latest end so far.
        let mut latest: Option<(&KeyedRun, u64)> = None;
        let mut last_token: Option<(&KeyedRun, u64)> = None;
        for k in list {
            if let Some((a, end)) = latest {
                if k.run.start_ms < end {
                    v.key_overlaps += 1;
                    out.push(violation(
                        "exec_key",
                        format!(
                            "execution key {key:?}: {} (pid {}, token {:?}) started at {} while {} (pid {}, token {:?}, started {}) ran until {end}{}",
                            k.job, k.run.pid, k.run.token, k.run.start_ms,
                            a.job, a.run.pid, a.run.token, a.run.start_ms,
                            if a.run.end.is_none() { " (cut; bounded)" } else { "" }
                        ),
                    ));
                }
            }
            if let Some(end) = k.end_ms {
                if latest.is_none_or(|(_, e)| end > e) {
                    latest = Some((k, end));
                }
            }
            match (k.run.token, last_token) {
                (None, _) => out.push(violation(
                    "exec_key",
                    format!(
                        "execution key {key:?}: {} ran without a fencing token",
                        k.job
                    ),
                )),
                (Some(t), Some((a, prev))) if t <= prev => {
                    v.key_tokens_not_growing += 1;
                    out.push(violation(
                        "exec_key",
                        format!(
                            "execution key {key:?}: {} started at {} with token {t}, after {} with token {prev}",
                            k.job, k.run.start_ms, a.job
                        ),
                    ));
                }
                (Some(t), _) => last_token = Some((k, t)),
            }
        }
    }
}

/// A job with a queue key, as the log and the runs tell.
struct QueueJob<'a> {
    job: String,
    entry: &'a EntrySum,
    /// When its request was first sent (the hold cannot be older).
    first_sent_ms: u64,
    /// When it left the queue at the latest: its first run's start, else its first
    /// result event (its hold is freed just before either).
    start_ms: Option<u64>,
}

/// Queue keys: every refusal had a job of its (process, key) queued, or a fault
/// window that can leave a hold behind; no request was accepted while another job of
/// its (process, key) was still queued; no hold is left for a finished job.
fn judge_queue_keys(
    log: &BTreeMap<String, ProcessLog>,
    results: &tests::support::JobResults,
    runs: &BTreeMap<String, Vec<Run>>,
    ev: &Evidence<'_>,
    windows: &[(u64, u64, &'static str, bool)],
    v: &mut Verdict,
    out: &mut Vec<Violation>,
) {
    let requests: HashMap<&str, &Queued> = ev.queued.iter().map(|q| (q.id.as_str(), q)).collect();
    let mut jobs: BTreeMap<(String, String), Vec<QueueJob>> = BTreeMap::new();
    for (process, plog) in log {
        for e in &plog.entries {
            let Some(key) = header(e, journal::subjects::QUEUE_KEY) else {
                continue;
            };
            let job = format!("{process}:{}", e.slot);
            let first_run = runs.get(&job).and_then(|r| r.first()).map(|r| r.start_ms);
            let first_event = results
                .jobs
                .get(&job)
                .and_then(|evs| evs.first())
                .map(|e| e.started_ms.unwrap_or(e.at_ms));
            let start_ms = match (first_run, first_event) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let first_sent_ms = requests
                .get(e.message_id.as_str())
                .map_or(e.timestamp_ms, |q| q.first_sent());
            jobs.entry((process.clone(), key.to_string()))
                .or_default()
                .push(QueueJob {
                    job,
                    entry: e,
                    first_sent_ms,
                    start_ms,
                });
        }
    }
    let in_log: BTreeSet<&str> = jobs
        .values()
        .flatten()
        .map(|j| j.entry.message_id.as_str())
        .collect();
    let not_released = |job: &str| {
        let what = format!("{job}: queue key not released");
        ev.not_released.iter().find(|l| mentions(&l.text, &what))
    };
    // Refusals.
    for q in ev.queued {
        v.queue_requests += 1;
        let pk = (q.process.clone(), q.key.clone());
        let mine: &[QueueJob] = jobs.get(&pk).map_or(&[], |j| j.as_slice());
        for a in &q.answers {
            match a.got {
                Got::Slot(_) => {
                    v.queue_receipts += 1;
                    continue;
                }
                Got::Other(_) => continue,
                Got::Held => v.queue_refusals += 1,
            }
            // Held by a job whose hold may have existed then: its request sent before
            // the refusal was answered, and not started before the refusal was sent.
            if mine.iter().any(|j| {
                j.first_sent_ms <= a.answered_ms && j.start_ms.is_none_or(|s| s >= a.sent_ms)
            }) {
                v.queue_refusals_explained += 1;
                continue;
            }
            // A pending hold: a request of the key whose answer left its fate unknown
            // and that was never written (ARCHITECTURE.md "Queue keys", crash windows).
            let pending = ev.queued.iter().find(|o| {
                o.process == q.process
                    && o.key == q.key
                    && o.unknown()
                    && o.first_sent() <= a.answered_ms
                    && !in_log.contains(o.id.as_str())
            });
            // A hold its job's instance could not free (the known gap).
            let stuck = mine
                .iter()
                .filter(|j| j.first_sent_ms <= a.answered_ms)
                .find_map(|j| not_released(&j.job));
            let why = match (pending, stuck) {
                (Some(o), _) => Some((
                    "pending hold",
                    format!(
                        "request {} answered {:?}",
                        o.id,
                        o.answers.last().map(|x| &x.got)
                    ),
                )),
                (None, Some(l)) => Some(("hold not released", l.text.clone())),
                (None, None) => None,
            };
            match why {
                Some((what, detail)) => {
                    *v.queue_refusals_attributed
                        .entry(what.to_string())
                        .or_default() += 1;
                    v.notes.push(format!(
                        "queue key {}/{}: {} refused at {}..{}: {what} ({detail})",
                        q.process, q.key, q.id, a.sent_ms, a.answered_ms
                    ));
                }
                None => {
                    v.queue_refusal_violations += 1;
                    out.push(violation(
                        "queue_key",
                        format!(
                            "{}/{}: {} refused queue_key_held at {}..{}, but no job of the key was queued then ({})",
                            q.process,
                            q.key,
                            q.id,
                            a.sent_ms,
                            a.answered_ms,
                            mine.iter()
                                .map(|j| format!("{} sent {} start {:?}", j.job, j.first_sent_ms, j.start_ms))
                                .collect::<Vec<_>>()
                                .join("; ")
                        ),
                    ));
                }
            }
        }
    }
    // Two jobs of one key queued at once: the later one was assigned (its hold was
    // taken) more than a grace before the earlier one left the queue. The grace covers
    // the design's order (the hold is freed just before the handler starts); a fault
    // that kills or stops an instance between the two, or stalls the server (the
    // release's answer lost, the job started later), is named, not failed.
    let delays = |from: u64, to: u64| {
        windows
            .iter()
            .filter(|(s, e, n, _)| {
                *s <= to
                    && *e >= from
                    && matches!(
                        *n,
                        "worker_kill" | "feeder_kill" | "worker_term" | "nats_stall" | "nats_kill"
                    )
            })
            .map(|(_, _, n, _)| *n)
            .next()
    };
    for ((process, key), list) in &jobs {
        for (i, a) in list.iter().enumerate() {
            let Some(start) = a.start_ms else {
                continue;
            };
            for b in &list[i + 1..] {
                if b.entry.timestamp_ms + GRACE_MS >= start {
                    continue;
                }
                match delays(a.entry.timestamp_ms, start) {
                    Some(f) => {
                        *v.queue_both_queued_attributed
                            .entry(f.to_string())
                            .or_default() += 1;
                        v.notes.push(format!(
                            "queue key {process}/{key}: {} assigned at {} while {} (assigned {}) started only at {start}: {f}",
                            b.job, b.entry.timestamp_ms, a.job, a.entry.timestamp_ms
                        ));
                    }
                    None => {
                        v.queue_both_queued += 1;
                        out.push(violation(
                            "queue_key",
                            format!(
                                "{process}/{key}: {} assigned at {} while {} (assigned {}) was queued until {start}",
                                b.job, b.entry.timestamp_ms, a.job, a.entry.timestamp_ms
                            ),
                        ));
                    }
                }
            }
        }
    }
    // Holds left after settling.
    for (name, hold, revision) in ev.holds {
        v.holds_left += 1;
        let process = name.split('.').next().unwrap_or_default();
        let token = hold.token(*revision);
        let job = jobs
            .get(&(process.to_string(), hold.key.clone()))
            .and_then(|l| {
                l.iter().find(|j| match hold.slot {
                    Some(s) => j.entry.slot == s,
                    None => {
                        header(j.entry, journal::subjects::QUEUE_HOLD)
                            .and_then(|t| t.parse::<u64>().ok())
                            == Some(token)
                    }
                })
            });
        let why = match job {
            Some(j) => {
                let finished = results
                    .jobs
                    .get(&j.job)
                    .is_some_and(|evs| evs.iter().any(|e| e.state.is_final()));
                match not_released(&j.job) {
                    Some(_) if finished => Some("release failed"),
                    // Not final: the job's own violation says so.
                    _ if !finished => Some("job not final"),
                    _ => None,
                }
            }
            None => ev
                .queued
                .iter()
                .any(|q| {
                    q.process == process
                        && q.key == hold.key
                        && q.unknown()
                        && Some(&q.id) == hold.message_id.as_ref()
                })
                .then_some("pending, request of unknown fate"),
        };
        match why {
            Some(w) => {
                *v.holds_left_attributed.entry(w.to_string()).or_default() += 1;
                v.notes
                    .push(format!("hold left: {name} {hold:?} token {token}: {w}"));
            }
            None => {
                v.holds_left_violations += 1;
                out.push(violation(
                    "queue_key",
                    format!(
                        "hold left in the bucket after settling: {name} {hold:?} (token {token}), {}",
                        match job {
                            Some(j) => format!("its job {} is final", j.job),
                            None => "no job and no request of unknown fate".to_string(),
                        }
                    ),
                ));
            }
        }
    }
}

/// The holds in the queue-keys bucket now: key, hold, revision.
async fn holds_left(js: &async_nats::jetstream::Context) -> Result<Vec<(String, Hold, u64)>> {
    let kv = js
        .get_key_value(Subjects::default().queue_keys_bucket())
        .await?;
    let keys: Vec<String> = futures::TryStreamExt::try_collect(kv.keys().await?).await?;
    let mut out = Vec::new();
    for k in keys {
        if let Some(e) = kv.entry(&k).await? {
            if e.operation == async_nats::jetstream::kv::Operation::Put {
                out.push((k, Hold::decode(&e.value)?, e.revision));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod oracle_tests {
    use super::*;

    fn run(start_ms: u64, end: Option<u64>, token: u64) -> Run {
        Run {
            pid: format!("{start_ms}"),
            start_ms,
            end: end.map(|e| (false, e)),
            ppid: Some(1),
            key: Some("e0".into()),
            token: Some(token),
        }
    }

    fn judged(runs: &[(Run, Option<u64>)]) -> (Verdict, Vec<Violation>) {
        let list = runs
            .iter()
            .enumerate()
            .map(|(i, (r, end_ms))| KeyedRun {
                job: format!("p{i}:0"),
                run: r,
                end_ms: *end_ms,
                lease_lost: false,
            })
            .collect();
        let by_key = BTreeMap::from([("e0".to_string(), list)]);
        let mut v = Verdict::default();
        let mut out = Vec::new();
        judge_exec_keys(&by_key, &mut v, &mut out);
        (v, out)
    }

    #[test]
    fn runs_of_one_key_one_after_the_other_pass_and_an_overlap_or_an_old_token_fails() {
        let (v, out) = judged(&[
            (run(100, Some(200), 5), Some(200)),
            (run(200, None, 7), Some(260)),
            (run(300, Some(400), 9), Some(400)),
        ]);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(v.key_overlaps, 0);
        // The second run's bounded end reaches past the third's start.
        let (v, out) = judged(&[
            (run(100, Some(200), 5), Some(200)),
            (run(200, None, 7), Some(310)),
            (run(300, Some(400), 9), Some(400)),
        ]);
        assert_eq!((v.key_overlaps, out.len()), (1, 1), "{out:?}");
        // A long first run overlaps every later one, not only the next.
        let (v, _) = judged(&[
            (run(100, Some(1_000), 5), Some(1_000)),
            (run(200, Some(300), 7), Some(300)),
            (run(400, Some(500), 9), Some(500)),
        ]);
        assert_eq!(v.key_overlaps, 2);
        let (v, out) = judged(&[
            (run(100, Some(200), 9), Some(200)),
            (run(300, Some(400), 7), Some(400)),
        ]);
        assert_eq!((v.key_tokens_not_growing, out.len()), (1, 1), "{out:?}");
    }

    #[test]
    fn tracing_timestamps_and_job_mentions_are_read() {
        assert_eq!(
            parse_utc_ms("2026-12-02T11:46:19.814010Z"),
            Some(1_796_211_979_814)
        );
        assert_eq!(parse_utc_ms("1970-01-01T00:00:01Z"), Some(1_000));
        assert_eq!(parse_utc_ms("not a time"), None);
        assert!(mentions(
            "WARN x: p1:5: queue key not released",
            "p1:5: queue"
        ));
        assert!(!mentions(
            "WARN x: wp1:5: queue key not released",
            "p1:5: queue"
        ));
    }
}
