//! `--alarms` (`make chaos ALARMS=1`): the alarm-loader under injected faults, checked
//! from the log and the alarms' histories.
//!
//! The rig is the one of the scheduler scenario (the same servers, `--replicas`
//! scheduler replicas that take the firings) plus `--loaders` alarm-loaders (the real
//! binary). For `--duration` seconds a seeded workload sets alarms through the loaders'
//! own requests (`ts.alarm.set` / `cancel`, `ts.cron.add` / `delete`): process targets
//! due now, soon (1–15 s), in the past (1–120 s), set and then replaced (the replace
//! racing the first firing), set and then cancelled (the cancel racing the firing);
//! subject targets answered by a responder the harness runs (`chaos.alarms.ok`: ok;
//! `.retry`: "retry in 1.5 s with a new body", then ok; `.error`: an error every time,
//! two attempts, then dead); and three cron jobs (`@every 1s` and `@every 3s` into
//! processes, `@every 2s` to the responder, `missed: all`), deleted when the workload
//! ends. A set or cancel is sent again while its answer is unknown (timeout, no
//! responders, `busy`, `unavailable`), as a client would.
//!
//! Faults, seeded and one at a time through the scheduler scenario's injector: a
//! loader killed (SIGKILL, restarted after 0–3 s), stopped (SIGTERM) and restarted,
//! restarted for 8–20 s with its clock skewed ±2–8 s (the loader's hidden
//! `--clock-skew-ms`), nats-server stalled (SIGSTOP 2–10 s) or killed and restarted in
//! place; with `--cluster`, the cluster's node and leader faults instead of the
//! server's.
//!
//! Then, after up to `--settle` seconds for what fell due to end, the oracle reads every
//! alarm's `ts.alarm.get` (its history), the log (the chain rule, as the scheduler
//! scenario does, and `turnstile verify --all`), the responder's calls and the dead
//! letters (`ts.alarms.dead` in `TS_ALARMS`), and checks:
//! 1. the log holds no foreign message, no gap and nothing but firings; a firing's
//!    message id (`alarm-<id>-<set_seq>-<due_ms>-<tag>`, schemas/alarms.md; only an id
//!    with the tag the firing key makes is a firing) is in the log at
//!    most once, names a version of its alarm that the history holds (a `set` at that
//!    sequence with that due time, or a `retry_asked`), and that version was claimed
//!    (an `attempt`) before anything ended it;
//! 2. a process-target alarm that was set and not cancelled is `done` by the end, and
//!    its last version's firing is in the log exactly once, at the slot its history
//!    records; one still `pending` or `dispatching` is missing, one `dead` failed;
//! 3. a cancelled alarm fired only if the history shows its claim before the cancel;
//!    a cancel answered `cancelled: true` leaves the alarm `cancelled`;
//! 4. a subject target was called only with firings its history holds (duplicates of
//!    one `Ts-Alarm-Firing` are allowed: at least once), and its end matches what the
//!    responder did: `ok` → `done` after an ok answer; `retry` → a `retry_asked` of 1.5 s
//!    and then `done`; `error` → `dead`, with a dead letter; a `delivered` event only
//!    after an ok answer;
//! 5. every tick of a cron job from its creation to 15 s before its deletion (the
//!    largest skew and a margin) has its alarm (`cron-<job>-<tick>`), fired once (done)
//!    or skipped with its reason in the history; later ticks are done or skipped; none
//!    is left pending.
//!
//! Every loader and replica must answer PING after each fault and exit within 20 s of
//! SIGTERM (the scheduler scenario's rule 7).

use std::collections::BTreeSet;

use alarm_loader::alarm::FiringKey;
use base64::Engine as _;

use super::*;

/// The loaders' service name (services API).
const LOADER_SERVICE: &str = "turnstile-alarm-loader";
/// Processes the process-target alarms spread over.
const PROCESSES: usize = 16;
/// How long one alarm or cron request waits for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a set, cancel, add or delete is sent again while its fate is unknown.
const SEND_SPAN_MS: u64 = 60_000;
/// What the responder asks of a `retry` target.
const RETRY_IN_MS: u64 = 1_500;
/// The largest clock skew the faults give a loader, and a margin: a cron tick this
/// long before its job's deletion must have fired.
const CRON_MARGIN_MS: u64 = 15_000;
/// How far past its deletion a job's ticks may have been planned (the window: twice
/// the 10 s interval, and the largest skew).
const CRON_HORIZON_MS: u64 = 30_000;
/// The RNG stream of the alarm workload.
const STREAM_ALARMS: u64 = 1 << 22;
/// Alarm requests in flight at once while the oracle reads.
const READS_IN_FLIGHT: usize = 32;

/// The cron jobs: name, `@every` seconds, target (a process, or the responder).
const JOBS: [(&str, u64, bool); 3] = [("beat1", 1, true), ("beat3", 3, true), ("sbeat2", 2, false)];

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Now,
    Soon,
    Past,
    Replaced,
    Cancelled,
    SubjectOk,
    SubjectRetry,
    SubjectError,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Now => "now",
            Kind::Soon => "soon",
            Kind::Past => "past",
            Kind::Replaced => "replaced",
            Kind::Cancelled => "cancelled",
            Kind::SubjectOk => "subject_ok",
            Kind::SubjectRetry => "subject_retry",
            Kind::SubjectError => "subject_error",
        }
    }

    /// The responder's subject for a subject target.
    fn subject(self) -> Option<&'static str> {
        match self {
            Kind::SubjectOk => Some("chaos.alarms.ok"),
            Kind::SubjectRetry => Some("chaos.alarms.retry"),
            Kind::SubjectError => Some("chaos.alarms.error"),
            _ => None,
        }
    }
}

/// One logical request (its resends included) and how it ended.
#[derive(Debug, Clone, Serialize)]
struct Sent {
    /// The due time a set asked for.
    due_ms: Option<u64>,
    /// What the answer said: a set's record sequence, a cancel's `cancelled`.
    seq: Option<u64>,
    cancelled: Option<bool>,
    attempts: usize,
    /// The last answer (or failure) in words.
    last: String,
    answered: bool,
}

/// An alarm the workload set, with every request it sent for it.
#[derive(Debug, Clone)]
struct Planned {
    id: String,
    kind: Kind,
    process: Option<String>,
    sets: Vec<Sent>,
    cancels: Vec<Sent>,
}

/// A cron job the workload added and deleted.
#[derive(Debug, Clone)]
struct Job {
    name: &'static str,
    every_ms: u64,
    process: Option<String>,
    created_ms: Option<u64>,
    deleting_ms: Option<u64>,
}

/// A call the responder took.
#[derive(Debug, Clone)]
struct Call {
    id: String,
    firing: String,
    attempt: String,
    answered: &'static str,
}

/// What the workload and the responder share.
struct Work {
    client: async_nats::Client,
    planned: Mutex<Vec<Planned>>,
    calls: Mutex<Vec<Call>>,
    requests: AtomicUsize,
    tracker: TaskTracker,
    stop_ms: u64,
    seed: u64,
    scale: f64,
}

/// One request to the loaders: the JSON answer, or the failure in words (`refused
/// <code>: …`, `timeout`, `no responders`, …).
async fn call(
    client: &async_nats::Client,
    subject: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let payload = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    match tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.request(subject.to_string(), payload.into()),
    )
    .await
    {
        Err(_) => Err("timeout".into()),
        Ok(Err(e)) => Err(match e.kind() {
            async_nats::RequestErrorKind::NoResponders => "no responders".into(),
            async_nats::RequestErrorKind::TimedOut => "timeout".into(),
            _ => e.to_string(),
        }),
        Ok(Ok(m)) => {
            if let Some(code) = m.headers.as_ref().and_then(|h| h.get("Ts-Error")) {
                let message = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Service-Error"))
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                return Err(format!("refused {code}: {message}"));
            }
            serde_json::from_slice(&m.payload).map_err(|e| format!("unparsable answer: {e}"))
        }
    }
}

/// Whether a failure leaves the request's fate unknown (or says to retry).
fn unknown(failure: &str) -> bool {
    !failure.starts_with("refused ")
        || failure.starts_with("refused busy")
        || failure.starts_with("refused unavailable")
}

/// Sends `body` to `subject` until it is answered or refused for good (or
/// [`SEND_SPAN_MS`] passed).
async fn send(
    work: &Work,
    subject: &str,
    body: &serde_json::Value,
) -> (Sent, Option<serde_json::Value>) {
    let first = now_ms();
    let mut sent = Sent {
        due_ms: body["due_ms"].as_u64(),
        seq: None,
        cancelled: None,
        attempts: 0,
        last: String::new(),
        answered: false,
    };
    loop {
        sent.attempts += 1;
        work.requests.fetch_add(1, Ordering::Relaxed);
        match call(&work.client, subject, body).await {
            Ok(v) => {
                sent.answered = true;
                sent.seq = v["seq"].as_u64();
                sent.cancelled = v["cancelled"].as_bool();
                sent.last = "answered".into();
                return (sent, Some(v));
            }
            Err(e) => {
                let again = unknown(&e) && now_ms().saturating_sub(first) < SEND_SPAN_MS;
                sent.last = e;
                if !again {
                    return (sent, None);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The draws of one alarm, made up front so that a seed replays the same workload.
struct Draw {
    due_in: i64,
    second_due_in: i64,
    then_ms: u64,
}

/// Sets alarm `id` of `kind` (and replaces or cancels it as its kind says).
async fn run_alarm(work: Arc<Work>, id: String, kind: Kind, process: Option<String>, draw: Draw) {
    let target = match (kind.subject(), &process) {
        (Some(s), _) => json!({"subject": s}),
        (None, Some(p)) => json!({"process": p}),
        (None, None) => return,
    };
    let mut body = json!({
        "id": id,
        "due_ms": wall_ms().saturating_add_signed(draw.due_in),
        "target": target,
        "body": b64(&format!("chaos alarm {id} v1")),
    });
    match kind {
        Kind::SubjectRetry => body["body"] = json!(b64("first")),
        Kind::SubjectError => {
            body["dispatch_timeout_ms"] = json!(2_000);
            body["retry"] = json!({"attempts": 2, "backoff_ms": 200, "max_backoff_ms": 200});
        }
        _ => {}
    }
    let mut planned = Planned {
        id: id.clone(),
        kind,
        process,
        sets: Vec::new(),
        cancels: Vec::new(),
    };
    let (sent, _) = send(&work, "ts.alarm.set", &body).await;
    planned.sets.push(sent);
    match kind {
        Kind::Replaced => {
            tokio::time::sleep(Duration::from_millis(draw.then_ms)).await;
            body["due_ms"] = json!(wall_ms().saturating_add_signed(draw.second_due_in));
            body["body"] = json!(b64(&format!("chaos alarm {id} v2")));
            let (sent, _) = send(&work, "ts.alarm.set", &body).await;
            planned.sets.push(sent);
        }
        Kind::Cancelled => {
            tokio::time::sleep(Duration::from_millis(draw.then_ms)).await;
            let (sent, _) = send(&work, "ts.alarm.cancel", &json!({"id": id})).await;
            planned.cancels.push(sent);
        }
        _ => {}
    }
    if let Ok(mut p) = work.planned.lock() {
        p.push(planned);
    }
}

/// The seeded workload: an alarm every 100–400 ms (divided by `--scale`) until 20 s
/// before the end (so that what it sets falls due within the run).
async fn workload(work: Arc<Work>) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(work.seed);
    rng.set_stream(STREAM_ALARMS);
    let mut n = 0u64;
    while now_ms() + 20_000 < work.stop_ms {
        n += 1;
        let kind = [
            (Kind::Now, 15),
            (Kind::Soon, 20),
            (Kind::Past, 10),
            (Kind::Replaced, 10),
            (Kind::Cancelled, 15),
            (Kind::SubjectOk, 12),
            (Kind::SubjectRetry, 8),
            (Kind::SubjectError, 5),
        ]
        .choose_weighted(&mut rng, |k| k.1)
        .map_or(Kind::Now, |k| k.0);
        let first: i64 = match kind {
            Kind::Now => 0,
            Kind::Soon => rng.gen_range(1_000..=15_000),
            Kind::Past => -rng.gen_range(1_000..=120_000),
            Kind::Replaced | Kind::Cancelled => rng.gen_range(2_000..=12_000),
            _ => rng.gen_range(0..=10_000),
        };
        let draw = Draw {
            due_in: first,
            second_due_in: rng.gen_range(1_000..=10_000),
            // Before, around or after the first due time.
            then_ms: rng.gen_range(0..=first.max(0) as u64 + 3_000),
        };
        let process = Some(format!("al-{}", rng.gen_range(0..PROCESSES)));
        let id = format!("{}{n}", kind.name().replace('_', ""));
        work.tracker
            .spawn(run_alarm(Arc::clone(&work), id, kind, process, draw));
        let pause = rng.gen_range(100..=400) as f64 / work.scale.max(0.01);
        tokio::time::sleep(Duration::from_millis(pause as u64)).await;
    }
    Ok(())
}

/// The subject targets' responder: answers by subject (`ok`, `retry` once then ok,
/// `error`, `cron`: ok) and records every call.
async fn responder(work: Arc<Work>, nats: async_nats::Client) -> Result<()> {
    let mut sub = nats.subscribe("chaos.alarms.>").await?;
    nats.flush().await?;
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            };
            let (id, firing) = (header("Ts-Alarm-Id"), header("Ts-Alarm-Firing"));
            let attempt = header("Ts-Alarm-Attempt");
            let (answered, answer) = match m.subject.as_str() {
                "chaos.alarms.retry" if &m.payload[..] == b"first" => (
                    "retry",
                    json!({"result": "retry", "in_ms": RETRY_IN_MS, "body_base64": b64("second")}),
                ),
                "chaos.alarms.error" => ("error", json!({"result": "error", "reason": "chaos"})),
                _ => ("ok", json!({"result": "ok"})),
            };
            if let Some(reply) = m.reply.clone() {
                let _ = nats
                    .publish(
                        reply,
                        serde_json::to_vec(&answer).unwrap_or_default().into(),
                    )
                    .await;
            }
            if let Ok(mut c) = work.calls.lock() {
                c.push(Call {
                    id,
                    firing,
                    attempt,
                    answered,
                });
            }
        }
    });
    Ok(())
}

/// Adds the cron jobs; their creation times as the loaders stored them.
async fn add_jobs(work: &Work) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (name, every, process) in JOBS {
        let target = if process {
            json!({"process": format!("cron-{name}")})
        } else {
            json!({"subject": "chaos.alarms.cron"})
        };
        let body = json!({
            "name": name,
            "schedule": format!("@every {every}s"),
            "target": target,
            "body": b64(&format!("chaos tick {name}")),
            "missed": "all",
            "missed_bound": 1000,
        });
        let (sent, _) = send(work, "ts.cron.add", &body).await;
        let created_ms = if sent.answered {
            send(work, "ts.cron.get", &json!({"name": name}))
                .await
                .1
                .and_then(|v| v["job"]["created_ms"].as_u64())
        } else {
            None
        };
        jobs.push(Job {
            name,
            every_ms: every * 1000,
            process: process.then(|| format!("cron-{name}")),
            created_ms,
            deleting_ms: None,
        });
    }
    jobs
}

/// The alarm's `get` answer (none: not found), asked until answered.
async fn get(work: &Work, id: &str) -> Result<Option<serde_json::Value>, String> {
    let (sent, answer) = send(work, "ts.alarm.get", &json!({"id": id})).await;
    match answer {
        Some(v) => Ok(Some(v)),
        None if sent.last.starts_with("refused not_found") => Ok(None),
        None => Err(sent.last),
    }
}

fn status_of(got: &serde_json::Value) -> &str {
    got["status"]["status"].as_str().unwrap_or("?")
}

fn is_final(status: &str) -> bool {
    matches!(status, "done" | "dead" | "cancelled" | "skipped")
}

/// Reads every alarm in `ids` until each is final or `deadline_ms` passed; the last
/// answers (an id that is not found: absent).
async fn settle_all(
    work: &Arc<Work>,
    ids: Vec<String>,
    deadline_ms: u64,
) -> BTreeMap<String, Result<Option<serde_json::Value>, String>> {
    let mut got: BTreeMap<String, Result<Option<serde_json::Value>, String>> = BTreeMap::new();
    let mut todo = ids;
    loop {
        let permits = Arc::new(Semaphore::new(READS_IN_FLIGHT));
        let mut tasks = Vec::new();
        for id in todo.drain(..) {
            let (w, permits) = (Arc::clone(work), Arc::clone(&permits));
            tasks.push(tokio::spawn(async move {
                let _p = permits.acquire_owned().await;
                let g = get(&w, &id).await;
                (id, g)
            }));
        }
        for t in tasks {
            if let Ok((id, g)) = t.await {
                got.insert(id, g);
            }
        }
        todo = got
            .iter()
            .filter(|(_, g)| matches!(g, Ok(Some(v)) if !is_final(status_of(v))))
            .map(|(id, _)| id.clone())
            .collect();
        if todo.is_empty() || now_ms() >= deadline_ms {
            return got;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every dead letter's alarm id (`ts.alarms.dead`, stored in `TS_ALARMS`).
async fn dead_letters(operator_url: &str) -> Result<BTreeMap<String, usize>> {
    use async_nats::jetstream::consumer;
    let js = async_nats::jetstream::new(connect(operator_url).await?);
    let mut stream = js.get_stream(Subjects::default().alarms_stream()).await?;
    let mut out = BTreeMap::new();
    let info = stream.info().await?;
    if info.state.messages == 0 {
        return Ok(out);
    }
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: Subjects::default().alarm_dead(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let pending = reader.cached_info().num_pending;
    let mut messages = reader.messages().await?;
    for _ in 0..pending {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await
        else {
            bail!("reading the dead letters: none within 10 s");
        };
        let m = m.map_err(|e| anyhow::anyhow!("reading the dead letters: {e}"))?;
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        let id = v["alarm"]["id"].as_str().unwrap_or("?").to_string();
        *out.entry(id).or_default() += 1;
    }
    Ok(out)
}

/// A version of an alarm: what one firing id stands for.
#[derive(Debug, Clone)]
struct Version {
    /// The sequence of the set record that made it.
    set_seq: u64,
    /// Its due time, or the times it may have: a set's due time is the one of a
    /// request the harness sent for the alarm (a resend whose first copy was taken
    /// late lands after a later request: which request a set record is, is not known
    /// for sure; its due time is one of those sent).
    dues: Vec<u64>,
    attempted: bool,
    /// What ended it: `replaced`, `retry`, `cancelled`, `skipped`, `dead`; none: it
    /// stands (or was delivered).
    ended: Option<&'static str>,
}

impl Version {
    /// Whether `firing` (a message id or a `Ts-Alarm-Firing`) is this version's.
    fn is(&self, firing: &str) -> bool {
        parse_firing(firing)
            .is_some_and(|(_, seq, due, _)| seq == self.set_seq && self.dues.contains(&due))
    }
}

/// An alarm's versions, from its history (`set` and `retry_asked` records), with the
/// due times a set record may have (`dues`).
fn versions(got: &serde_json::Value, dues: &[u64]) -> Vec<Version> {
    let mut out: Vec<Version> = Vec::new();
    let mut set_seq = 0;
    for h in got["history"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let ev = &h["event"];
        let end = |out: &mut Vec<Version>, why: &'static str| {
            if let Some(v) = out.last_mut() {
                if v.ended.is_none() {
                    v.ended = Some(why);
                }
            }
        };
        match ev["event"].as_str().unwrap_or("") {
            "set" => {
                end(&mut out, "replaced");
                set_seq = h["seq"].as_u64().unwrap_or(0);
                out.push(Version {
                    set_seq,
                    dues: dues.to_vec(),
                    attempted: false,
                    ended: None,
                });
            }
            "attempt" => {
                if let Some(v) = out.last_mut() {
                    v.attempted = true;
                }
            }
            "retry_asked" => {
                end(&mut out, "retry");
                let due = ev["at_ms"].as_u64().unwrap_or(0) + ev["in_ms"].as_u64().unwrap_or(0);
                out.push(Version {
                    set_seq,
                    dues: vec![due],
                    attempted: false,
                    ended: None,
                });
            }
            "cancelled" => end(&mut out, "cancelled"),
            "skipped" => end(&mut out, "skipped"),
            "dead_lettered" => end(&mut out, "dead"),
            _ => {}
        }
    }
    out
}

/// A firing's message id (`alarm-<id>-<set_seq>-<due>-<tag>`): the alarm id, the set
/// sequence, the due time, the tag.
fn parse_firing(message_id: &str) -> Option<(&str, u64, u64, &str)> {
    let rest = message_id.strip_prefix("alarm-")?;
    let mut parts = rest.rsplitn(4, '-');
    let tag = parts.next()?;
    let due = parts.next()?.parse::<u64>().ok()?;
    let seq = parts.next()?.parse::<u64>().ok()?;
    Some((parts.next()?, seq, due, tag))
}

/// The alarm id of a firing's message id, if its tag is the one the firing key makes
/// (no client can make it: anything else is no firing).
fn alarm_of_firing<'a>(key: &FiringKey, message_id: &'a str) -> Option<&'a str> {
    parse_firing(message_id)
        .filter(|&(id, seq, due, tag)| key.tag(id, seq, due) == tag)
        .map(|(id, ..)| id)
}

/// Whether `firing` (a subject call's `Ts-Alarm-Firing`) is a firing of alarm `id`
/// (its tag the key's) and of one of its versions `vs` (rule 4).
fn is_called_firing(key: &FiringKey, id: &str, vs: &[Version], firing: &str) -> bool {
    alarm_of_firing(key, firing) == Some(id) && vs.iter().any(|x| x.is(firing))
}

/// The deployment's firing key, read as the operator (alarms.md "Storage").
async fn firing_key(operator_url: &str) -> Result<FiringKey> {
    let js = async_nats::jetstream::new(connect(operator_url).await?);
    let stream = js.get_stream(Subjects::default().alarms_stream()).await?;
    let key =
        journal::setup::read_firing_key(&stream, &Subjects::default().alarm_firing_key()).await?;
    Ok(FiringKey::new(key.ok_or_else(|| {
        anyhow::anyhow!("no firing key in the alarm stream")
    })?))
}

/// What the oracle counted (the JSON's `alarms`, the summary's rows).
#[derive(Debug, Default, Serialize)]
pub(super) struct Verdict {
    alarms: usize,
    by_kind: BTreeMap<&'static str, usize>,
    requests: usize,
    sets_unanswered: usize,
    cancels: usize,
    cancels_in_time: usize,
    cancelled_after_firing: usize,
    replaced_after_firing: usize,
    statuses: BTreeMap<String, usize>,
    firings_in_log: usize,
    other_entries: usize,
    subject_calls: usize,
    duplicate_calls: usize,
    calls_by_answer: BTreeMap<&'static str, usize>,
    dead_letters: usize,
    cron_ticks: usize,
    cron_done: usize,
    cron_skipped: BTreeMap<String, usize>,
    lateness_ms_p50: i64,
    lateness_ms_p99: i64,
    lateness_ms_max: i64,
    loader_starts: usize,
    unread: usize,
}

/// The checks of the module doc over the final answers, the log, the calls and the
/// dead letters.
#[allow(clippy::too_many_arguments)]
fn judge(
    planned: &[Planned],
    jobs: &[Job],
    got: &BTreeMap<String, Result<Option<serde_json::Value>, String>>,
    logs: &BTreeMap<String, ProcessLog>,
    calls: &[Call],
    dead: &BTreeMap<String, usize>,
    key: &FiringKey,
    verdict: &mut Verdict,
) -> Vec<Violation> {
    let mut v = Vec::new();
    // Every firing in the log: its places.
    let mut fired: HashMap<&str, Vec<(&str, u64)>> = HashMap::new();
    for (process, log) in logs {
        for e in &log.entries {
            if alarm_of_firing(key, &e.message_id).is_some() {
                fired
                    .entry(e.message_id.as_str())
                    .or_default()
                    .push((process.as_str(), e.slot));
                verdict.firings_in_log += 1;
            } else {
                verdict.other_entries += 1;
                v.push(violation(
                    "log",
                    format!("{process} slot {}: {:?} is no firing", e.slot, e.message_id),
                ));
            }
        }
    }
    for (firing, places) in &fired {
        if places.len() > 1 {
            v.push(violation(
                "once",
                format!(
                    "firing {firing} is in the log {} times: {places:?}",
                    places.len()
                ),
            ));
        }
    }
    let mut calls_of: HashMap<&str, Vec<&Call>> = HashMap::new();
    for c in calls {
        calls_of.entry(c.id.as_str()).or_default().push(c);
        *verdict.calls_by_answer.entry(c.answered).or_default() += 1;
    }
    verdict.subject_calls = calls.len();
    // A duplicate: the same attempt of a firing delivered again (another attempt of
    // it is a retry, not a duplicate).
    let mut per_firing: HashMap<(&str, &str), usize> = HashMap::new();
    for c in calls {
        *per_firing
            .entry((c.firing.as_str(), c.attempt.as_str()))
            .or_default() += 1;
    }
    verdict.duplicate_calls = per_firing.values().map(|n| n - 1).sum();
    verdict.dead_letters = dead.values().sum();
    let mut lateness: Vec<i64> = Vec::new();
    let mut explained: BTreeSet<&str> = BTreeSet::new();

    // Checks one alarm's answer; `process` for a process target.
    let mut check = |id: &str,
                     got: &serde_json::Value,
                     late: bool,
                     process: Option<&str>,
                     dues: &[u64],
                     v: &mut Vec<Violation>,
                     verdict: &mut Verdict| {
        let status = status_of(got);
        *verdict.statuses.entry(status.to_string()).or_default() += 1;
        let history = || {
            got["history"]
                .as_array()
                .map(|h| {
                    h.iter()
                        .map(|e| {
                            format!(
                                "{}@{}",
                                e["event"]["event"].as_str().unwrap_or("?"),
                                e["seq"]
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        };
        for h in got["history"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if late && h["event"]["event"] == "delivered" {
                if let Some(l) = h["event"]["lateness_ms"].as_i64() {
                    lateness.push(l);
                }
            }
        }
        let vs = versions(got, dues);
        let known = |firing: &str| vs.iter().find(|x| x.is(firing));
        if let Some(process) = process {
            // Rule 1 for its firings in the log.
            for (firing, places) in fired
                .iter()
                .filter(|(f, _)| alarm_of_firing(key, f) == Some(id))
            {
                explained.insert(firing);
                match known(firing) {
                    None => v.push(violation(
                        "firing",
                        format!(
                            "{id}: firing {firing} at {places:?} is no version of its history ({})",
                            history()
                        ),
                    )),
                    Some(x) if !x.attempted => v.push(violation(
                        "firing",
                        format!(
                            "{id}: firing {firing} at {places:?} was never claimed ({})",
                            history()
                        ),
                    )),
                    Some(x) => {
                        if x.ended == Some("cancelled") {
                            verdict.cancelled_after_firing += 1;
                        }
                        if x.ended == Some("replaced") {
                            verdict.replaced_after_firing += 1;
                        }
                    }
                }
                if places.iter().any(|(p, _)| *p != process) {
                    v.push(violation(
                        "firing",
                        format!(
                            "{id}: firing {firing} in another process than {process}: {places:?}"
                        ),
                    ));
                }
            }
            // Rule 2.
            match status {
                "done" => {
                    let slot = got["status"]["slot"].as_u64();
                    let last = vs.last();
                    let mine: Vec<(&str, &Vec<(&str, u64)>)> = fired
                        .iter()
                        .filter(|(f, _)| last.is_some_and(|x| x.is(f)))
                        .map(|(f, places)| (*f, places))
                        .collect();
                    let at_slot = mine.iter().any(|(_, places)| {
                        places
                            .iter()
                            .any(|(p, s)| *p == process && Some(*s) == slot)
                    });
                    if mine.len() != 1 || !at_slot {
                        v.push(violation(
                            "done",
                            format!(
                                "{id}: done at slot {slot:?}; its last version's firings in the log: {mine:?} ({})",
                                history()
                            ),
                        ));
                    }
                }
                "cancelled" | "skipped" => {}
                other => v.push(violation(
                    "missing",
                    format!(
                        "{id}: {other} at the end of the settle time: {} ({})",
                        got["status"],
                        history()
                    ),
                )),
            }
        }
        (status.to_string(), vs)
    };

    for p in planned {
        verdict.alarms += 1;
        *verdict.by_kind.entry(p.kind.name()).or_default() += 1;
        verdict.sets_unanswered += p.sets.iter().filter(|s| !s.answered).count();
        verdict.cancels += p.cancels.len();
        verdict.cancels_in_time += p
            .cancels
            .iter()
            .filter(|c| c.cancelled == Some(true))
            .count();
        let answer = match got.get(&p.id) {
            Some(Ok(Some(a))) => a,
            Some(Ok(None)) => {
                if p.sets.iter().any(|s| s.answered) {
                    v.push(violation(
                        "missing",
                        format!("{}: set (answered), yet not found", p.id),
                    ));
                }
                continue;
            }
            Some(Err(e)) => {
                verdict.unread += 1;
                v.push(violation("harness", format!("{}: not read: {e}", p.id)));
                continue;
            }
            None => continue,
        };
        let dues: Vec<u64> = p.sets.iter().filter_map(|s| s.due_ms).collect();
        let (status, vs) = check(
            &p.id,
            answer,
            p.kind != Kind::Past,
            p.process.as_deref().filter(|_| p.kind.subject().is_none()),
            &dues,
            &mut v,
            verdict,
        );
        // Rule 3.
        // (A set resent by the harness, whose first copy a loader took late, may land
        // after the cancel: then the history shows a set after it.)
        let set_after_cancel = answer["history"].as_array().is_some_and(|h| {
            h.iter()
                .rev()
                .take_while(|e| e["event"]["event"] != "cancelled")
                .any(|e| e["event"]["event"] == "set")
        });
        if p.cancels.iter().any(|c| c.cancelled == Some(true))
            && status != "cancelled"
            && !set_after_cancel
        {
            v.push(violation(
                "cancel",
                format!("{}: a cancel answered cancelled, yet it is {status}", p.id),
            ));
        }
        // Rule 4.
        if p.kind.subject().is_some() {
            let mine = calls_of
                .get(p.id.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            for c in mine {
                if !is_called_firing(key, &p.id, &vs, &c.firing) {
                    v.push(violation(
                        "subject",
                        format!(
                            "{}: called with firing {} that its history does not hold",
                            p.id, c.firing
                        ),
                    ));
                }
            }
            let ok_calls = mine.iter().filter(|c| c.answered == "ok").count();
            let delivered = answer["history"]
                .as_array()
                .is_some_and(|h| h.iter().any(|e| e["event"]["event"] == "delivered"));
            if delivered && ok_calls == 0 {
                v.push(violation(
                    "subject",
                    format!("{}: delivered, yet the responder never answered ok", p.id),
                ));
            }
            let want = match p.kind {
                Kind::SubjectError => "dead",
                _ => "done",
            };
            if status != want {
                v.push(violation(
                    "subject",
                    format!(
                        "{}: {status} at the end, the responder made it {want} ({} calls)",
                        p.id,
                        mine.len()
                    ),
                ));
            }
            if p.kind == Kind::SubjectRetry
                && !answer["history"].as_array().is_some_and(|h| {
                    h.iter().any(|e| {
                        e["event"]["event"] == "retry_asked" && e["event"]["in_ms"] == RETRY_IN_MS
                    })
                })
            {
                v.push(violation(
                    "subject",
                    format!(
                        "{}: no retry_asked of {RETRY_IN_MS} ms in its history",
                        p.id
                    ),
                ));
            }
            if status == "dead" && !dead.contains_key(&p.id) {
                v.push(violation(
                    "dead_letter",
                    format!("{}: dead without a dead letter", p.id),
                ));
            }
        }
    }

    // Rule 5.
    for job in jobs {
        let (Some(created), Some(deleting)) = (job.created_ms, job.deleting_ms) else {
            v.push(violation(
                "harness",
                format!("cron job {} was not added or not deleted", job.name),
            ));
            continue;
        };
        let mut tick = created + job.every_ms;
        while tick <= deleting + CRON_HORIZON_MS {
            let id = format!("cron-{}-{tick}", job.name);
            let dues = [tick];
            let must = tick + CRON_MARGIN_MS <= deleting;
            match got.get(&id) {
                Some(Ok(Some(a))) => {
                    verdict.cron_ticks += 1;
                    let (status, vs) =
                        check(&id, a, true, job.process.as_deref(), &dues, &mut v, verdict);
                    match status.as_str() {
                        "done" => verdict.cron_done += 1,
                        "skipped" => {
                            let reason = a["status"]["reason"].as_str().unwrap_or("?");
                            let reason = reason.split(" (").next().unwrap_or(reason).to_string();
                            *verdict.cron_skipped.entry(reason).or_default() += 1;
                        }
                        _ => {}
                    }
                    if job.process.is_none() {
                        let mine = calls_of
                            .get(id.as_str())
                            .map(Vec::as_slice)
                            .unwrap_or_default();
                        for c in mine {
                            if !is_called_firing(key, &id, &vs, &c.firing) {
                                v.push(violation("subject", format!("{id}: called with firing {} that its history does not hold", c.firing)));
                            }
                        }
                        if !is_final(&status) {
                            v.push(violation(
                                "missing",
                                format!("{id}: {status} at the end of the settle time"),
                            ));
                        }
                        if status == "done" && !mine.iter().any(|c| c.answered == "ok") {
                            v.push(violation(
                                "subject",
                                format!("{id}: done, yet the responder never answered it"),
                            ));
                        }
                    }
                }
                Some(Ok(None)) if must => v.push(violation(
                    "cron",
                    format!(
                        "cron job {}: tick {tick} ({} s before its deletion) was never planned",
                        job.name,
                        (deleting - tick) / 1000
                    ),
                )),
                Some(Err(e)) => {
                    verdict.unread += 1;
                    v.push(violation("harness", format!("{id}: not read: {e}")));
                }
                _ => {}
            }
            tick += job.every_ms;
        }
    }
    // Firings of ids nobody planned.
    for (firing, places) in &fired {
        if !explained.contains(firing) {
            v.push(violation(
                "firing",
                format!("firing {firing} at {places:?}: of no alarm the harness set or planned"),
            ));
        }
    }
    lateness.sort_unstable();
    let pick = |q: f64| {
        lateness
            .get(((lateness.len() as f64 * q) as usize).min(lateness.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    verdict.lateness_ms_p50 = pick(0.5);
    verdict.lateness_ms_p99 = pick(0.99);
    verdict.lateness_ms_max = lateness.last().copied().unwrap_or(0);
    v
}

/// The alarm-loader scenario (the module doc).
pub(super) async fn run(args: &Args, seed: u64) -> Result<Outcome> {
    let kinds = fault_kinds(args.cluster, Scenario::Alarms, &args.faults)?;
    let Setup {
        rig,
        work: dir,
        ping,
        client_url,
        operator_url,
        nats_logs,
    } = setup(args, args.loaders, None).await?;
    let limits = Limits::fetch(&ping).await?;
    println!(
        "chaos: {} loaders and {} replicas on {}",
        args.loaders,
        args.replicas,
        rig.nats.describe()
    );
    let duration_ms = args.duration * 1000;
    let started = now_ms();
    let stop_ms = started + duration_ms;
    let work = Arc::new(Work {
        client: connect(&client_url).await?,
        planned: Mutex::new(Vec::new()),
        calls: Mutex::new(Vec::new()),
        requests: AtomicUsize::new(0),
        tracker: TaskTracker::new(),
        stop_ms,
        seed,
        scale: args.scale,
    });
    responder(Arc::clone(&work), connect(&client_url).await?).await?;
    let mut jobs = add_jobs(&work).await;
    let workload_task = tokio::spawn(workload(Arc::clone(&work)));
    let plan = if args.no_faults {
        Vec::new()
    } else {
        plan_faults(seed, args.replicas, args.loaders, 0, &kinds)
    };
    let rt = tokio::runtime::Handle::current();
    let last_start = stop_ms.saturating_sub(20_000);
    let injector =
        tokio::task::spawn_blocking(move || inject(rig, rt, plan, started + 8_000, last_start));
    workload_task.await??;
    let (mut rig, faults, injected) = injector.await?;
    let injector_error = injected.err().map(|e| format!("{e:#}"));
    let wait = Duration::from_millis(stop_ms.saturating_sub(now_ms()));
    tokio::time::sleep(wait).await;
    for job in &mut jobs {
        job.deleting_ms = Some(wall_ms());
        let (sent, _) = send(&work, "ts.cron.delete", &json!({"name": job.name})).await;
        if !sent.answered {
            job.deleting_ms = None;
        }
    }
    work.tracker.close();
    work.tracker.wait().await;
    println!(
        "[{:>6} s] workload done; cron jobs deleted; up to {} s for what fell due to end",
        secs(now_ms()),
        args.settle
    );
    rig.check_alive()?;
    let planned = work
        .planned
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut ids: Vec<String> = planned.iter().map(|p| p.id.clone()).collect();
    for job in &jobs {
        if let (Some(created), Some(deleting)) = (job.created_ms, job.deleting_ms) {
            let mut tick = created + job.every_ms;
            while tick <= deleting + CRON_HORIZON_MS {
                ids.push(format!("cron-{}-{tick}", job.name));
                tick += job.every_ms;
            }
        }
    }
    let got = settle_all(&work, ids, now_ms() + args.settle * 1000).await;
    let unsettled = got
        .values()
        .filter(|g| matches!(g, Ok(Some(v)) if !is_final(status_of(v))))
        .count();
    println!(
        "[{:>6} s] read {} alarms ({unsettled} not final); reading the log",
        secs(now_ms()),
        got.len()
    );
    for svc in [
        (LOADER_SERVICE, args.loaders),
        ("turnstile-scheduler", args.replicas),
    ] {
        if let Err(e) = wait_for_service(&ping, svc.0, svc.1).await {
            rig.violations.push(violation(
                "replica",
                format!("after the workload: {e} (at {} s)", secs(now_ms())),
            ));
        }
    }
    let (logs, mut violations) = read_all(&operator_url).await?;
    let dead = dead_letters(&operator_url).await?;
    let key = firing_key(&operator_url).await?;
    let calls = work
        .calls
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut verdict = Verdict::default();
    violations.extend(judge(
        &planned,
        &jobs,
        &got,
        &logs,
        &calls,
        &dead,
        &key,
        &mut verdict,
    ));
    verdict.requests = work.requests.load(Ordering::Relaxed);
    verdict.loader_starts = rig.loaders.iter().map(|l| l.starts).sum();
    let counts = Counts {
        assignments: logs.values().map(|l| l.entries.len()).sum(),
        processes: logs.len(),
        ..Counts::default()
    };
    drop(logs);
    let (verify, v) = verify_cli(&client_url, &counts, dir.path()).await?;
    violations.extend(v);
    rig.stop_all();
    let mut all = std::mem::take(&mut rig.violations);
    all.extend(violations);
    let mut logs: Vec<PathBuf> = rig
        .replicas
        .iter()
        .chain(&rig.loaders)
        .map(|r| r.log.clone())
        .collect();
    logs.push(dir.path().join("verify.err"));
    let outcome = Outcome {
        seed,
        counts,
        faults,
        events: Vec::new(),
        violations: all,
        verify,
        limits,
        elapsed_ms: now_ms() - started,
        logs: logs.clone(),
        nats_logs: nats_logs.clone(),
        injector_error,
        alarms: Some(verdict),
        workers: None,
    };
    if !outcome.violations.is_empty() || outcome.injector_error.is_some() {
        keep_logs(seed, &logs, &nats_logs);
    }
    drop(rig);
    drop(dir);
    Ok(outcome)
}

/// The summary's rows for an alarm run.
pub(super) fn summary(args: &Args, o: &Outcome, a: &Verdict) -> Vec<(&'static str, String)> {
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
    let owned = |m: &BTreeMap<String, usize>| {
        let m: BTreeMap<&str, usize> = m.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        join(&m)
    };
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &o.faults {
        *faults.entry(f.fault.name()).or_default() += 1;
    }
    let verify_ok = o.verify["ok"].as_bool().unwrap_or(false);
    vec![
        ("seed", format!("{} (replay: {})", o.seed, replay(args, o.seed))),
        (
            "ran",
            format!(
                "{} s, {} loaders ({} starts), {} replicas, {}, {} build",
                secs(o.elapsed_ms),
                args.loaders,
                a.loader_starts,
                args.replicas,
                if args.cluster { "a 3-node cluster" } else { "one nats-server" },
                profile()
            ),
        ),
        ("alarms", format!("{} ({})", a.alarms, join(&a.by_kind))),
        (
            "requests",
            format!(
                "{} to the loaders, reads included (sets unanswered {}; cancels {}, in time {})",
                a.requests, a.sets_unanswered, a.cancels, a.cancels_in_time
            ),
        ),
        ("statuses", owned(&a.statuses)),
        (
            "log",
            format!(
                "{} firings in {} processes ({} after a cancel, {} after a replace), {} other entries; turnstile verify --all: {}",
                a.firings_in_log,
                o.counts.processes,
                a.cancelled_after_firing,
                a.replaced_after_firing,
                a.other_entries,
                if verify_ok { "ok" } else { "NOT ok" }
            ),
        ),
        (
            "subject",
            format!(
                "{} calls ({}), {} duplicates (a firing's attempt again); {} dead letters",
                a.subject_calls,
                join(&a.calls_by_answer),
                a.duplicate_calls,
                a.dead_letters
            ),
        ),
        (
            "cron",
            format!(
                "{} ticks read, {} done, skipped: {}",
                a.cron_ticks,
                a.cron_done,
                owned(&a.cron_skipped)
            ),
        ),
        (
            "lateness",
            format!(
                "p50 {} ms, p99 {} ms, max {} ms (delivered events, past-due alarms aside)",
                a.lateness_ms_p50, a.lateness_ms_p99, a.lateness_ms_max
            ),
        ),
        ("faults", format!("{} ({})", o.faults.len(), join(&faults))),
        ("violations", o.violations.len().to_string()),
    ]
}
