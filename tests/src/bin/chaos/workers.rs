//! `--workers` (`make chaos WORKERS=1`): a worker group under injected faults, checked
//! from the log, the jobs' results and what the handler saw.
//!
//! The rig is the one of the scheduler scenario (one nats-server, `--replicas`
//! scheduler replicas that take the jobs' requests, never faulted here) plus
//! `--instances` instances of the real `worker` binary in one group (`chaos`, unordered,
//! `--max-attempts 4`, backoff 300 ms doubling to 2 s, `--ack-wait-ms 20000`: longer
//! than the longest stall), and one spare instance a scale-out fault starts for a
//! while. The handler is `sh -c`: it appends `start <process>:<slot> <pid> <ms> <ppid>`
//! to a file, fails (exit 1, a `fail` line) while the job has started no more times than
//! its body says, sleeps as long as its body says, then appends `end ...`.
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
//!    acknowledged until the resume was sent.
//!
//! Not checked here: execution keys (`Ts-Execution-Key`), built on another branch.

use std::collections::BTreeSet;

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
         echo \"start $k $$ $(date +%s%3N) $PPID\" >> $o; \
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

/// Pauses `wp<k>`, schedules six jobs into it, cancels two of them, resumes it after
/// 8–12 s.
async fn pause_episode(work: Arc<Work>, k: usize, mut rng: ChaCha8Rng) {
    let process = format!("wp{k}");
    let acked_ms = work
        .control(&worker::control::pause_key(GROUP, Some(&process)), true)
        .await;
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
        match *what {
            "start" => list.push(Run {
                pid: pid.to_string(),
                start_ms: ms,
                end: None,
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
    let failing_runs = runs
        .iter()
        .filter(|r| matches!(r.end, Some((true, _))))
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
            match runs.last() {
                Some(Run {
                    end: Some((false, _)),
                    ..
                }) => {}
                _ => out.push(violation(
                    "handler",
                    format!(
                        "{job}: done, but no run of its handler ended ({})",
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
    let runs = read_runs(&out);
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
        &mut verdict,
    ));
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
        ("faults", format!("{} ({})", o.faults.len(), join(&faults))),
        ("violations", o.violations.len().to_string()),
    ]
}
