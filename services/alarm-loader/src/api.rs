//! The `<prefix>.alarm.<op>` requests (schemas/alarms.md): JSON in, JSON out, typed
//! refusals in `Ts-Error` as every turnstile service answers them.

use serde::Deserialize;
use serde_json::{json, Value};

use protocol::wire::ErrorCode;

use crate::alarm::{bucket_of, Alarm, Record, Target, PARTITIONS};
use crate::cron::JobName;
use crate::jobs::{CronJob, StoredJob};
use crate::loader::Clock;
use crate::store::Store;
use crate::Error;

/// How far ahead an alarm may be due (10 years).
pub const MAX_HORIZON_MS: u64 = 10 * 366 * 86_400_000;
/// Largest request body.
pub const MAX_REQUEST: usize = 512 * 1024;
/// Longest time range one `list` may cover.
pub const MAX_LIST_RANGE_MS: u64 = 24 * 3600 * 1000;
/// Most events of an alarm's history one `get` returns (its oldest).
pub const MAX_HISTORY: usize = 1000;
/// Most alarms one `list` returns.
pub const MAX_LIST: usize = 1000;
/// Most alarms one `set_many` sets.
pub const MAX_SET_MANY: usize = 1000;
/// `set_many` requests setting at once (each up to [`MAX_SET_MANY`] sets in flight);
/// more wait their turn, among the requests being answered (`--max-answering`).
const SET_MANY_AT_ONCE: usize = 16;
static SET_MANY_TURNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(SET_MANY_AT_ONCE);

pub use service::Refusal;

impl From<Error> for Refusal {
    fn from(e: Error) -> Refusal {
        match e {
            Error::Invalid(m) => Refusal::new(ErrorCode::InvalidAlarm, m),
            Error::BadRecord { .. }
            | Error::JetStream { .. }
            | Error::Journal(_)
            | Error::Service(_) => Refusal::new(ErrorCode::Unavailable, e.to_string()),
            Error::Conflict(id) => Refusal::new(
                ErrorCode::Busy,
                format!("{id} is changing under another request; retry"),
            ),
            // The cron module's own refusals (schedule, zone, policy, name).
            other => Refusal::new(ErrorCode::InvalidAlarm, other.to_string()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdRequest {
    id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetManyRequest {
    alarms: Vec<Alarm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListRequest {
    from_ms: u64,
    to_ms: u64,
    #[serde(default)]
    target: Option<Target>,
    #[serde(default)]
    limit: Option<usize>,
}

/// A request body as `T`: a JSON object, nothing after it; a refusal names the member
/// at fault (`target.process: invalid type: …`).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    let malformed = |m: String| Refusal::new(ErrorCode::Malformed, m);
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(malformed("the body is not a JSON object".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        malformed(if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        })
    })?;
    de.end().map_err(|e| malformed(e.to_string()))?;
    Ok(value)
}

/// Answers one request of operation `op` with body `body`.
pub async fn handle(store: &Store, clock: &Clock, op: &str, body: &[u8]) -> Result<Value, Refusal> {
    if body.len() > MAX_REQUEST {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("request over {MAX_REQUEST} bytes"),
        ));
    }
    match op {
        "set" => set(store, clock, parse(body)?).await,
        // Boxed: its many sets in flight would size every request's future.
        "set_many" => Box::pin(set_many(store, clock, parse(body)?)).await,
        "cancel" => {
            let r: IdRequest = parse(body)?;
            cancel(store, clock, &r.id).await
        }
        "get" => {
            let r: IdRequest = parse(body)?;
            // Boxed (as `list`): reads of whole histories and windows would otherwise
            // size every request's future, the sets' too.
            Box::pin(get(store, &r.id)).await
        }
        "list" => Box::pin(list(store, parse(body)?)).await,
        other => Err(Refusal::new(
            ErrorCode::Malformed,
            format!("unknown operation {other:?}: set, set_many, cancel, get, list"),
        )),
    }
}

fn check_id(id: &str) -> Result<(), Refusal> {
    if crate::alarm::is_token(id, crate::alarm::MAX_ID) {
        Ok(())
    } else {
        Err(Refusal::new(
            ErrorCode::InvalidAlarm,
            format!(
                "id: 1-{} characters of A-Z a-z 0-9 - _",
                crate::alarm::MAX_ID
            ),
        ))
    }
}

/// Sets (or replaces) an alarm: persisted before the answer. A due time in the past
/// fires at once.
async fn set(store: &Store, clock: &Clock, alarm: Alarm) -> Result<Value, Refusal> {
    alarm.validate_client(store.subjects())?;
    if alarm.due_ms > clock().saturating_add(MAX_HORIZON_MS) {
        return Err(Refusal::new(
            ErrorCode::InvalidAlarm,
            format!(
                "due_ms: more than {} days ahead",
                MAX_HORIZON_MS / 86_400_000
            ),
        ));
    }
    // The common case, an id never set: its record is written expecting an empty
    // subject, without reading first (a read is a round trip through the JetStream
    // API, the most expensive part of a set). Anything stored there (a record, a
    // foreign message) refuses that write; the set then reads and replaces.
    let now = clock();
    // Never index behind the present: the sweep may have passed that bucket.
    let first_at = alarm.due_ms.max(now);
    let first_entry = store.put_due(&alarm.id, first_at, now).await?;
    match store.append(&Record::set(alarm.clone(), now), 0).await {
        Ok(seq) => {
            return Ok(json!({
                "id": alarm.id,
                "seq": seq,
                "due_ms": alarm.due_ms,
                "replaced": false,
            }))
        }
        // Its entry stays: an extra entry is a hint the record then decides.
        Err(Error::Conflict(_)) => {}
        Err(e) => return Err(e.into()),
    }
    for attempt in 0..3 {
        let now = clock();
        // A set replaces whatever is stored, foreign messages included. The first read
        // may be stale (any replica's; the compare-and-set below judges it), those
        // after a conflict are the leader's.
        let current = if attempt == 0 {
            store.current_for_write(&alarm.id).await?
        } else {
            store.current(&alarm.id).await?
        };
        let existing = current.record;
        let record = Record::set(alarm.clone(), now);
        // Never index behind the present: the sweep may have passed that bucket.
        let at = alarm.due_ms.max(now);
        let expected = current.last_seq;
        // The entry written above serves if it is in the same bucket and was stored
        // after the message this write expects: a removal is bounded by the record
        // that made an entry obsolete, and every record up to that message is older
        // than the entry, so none removes it; a record after it would fail this write.
        let indexed = bucket_of(at) == bucket_of(first_at) && first_entry > expected;
        if !indexed {
            store.put_due(&alarm.id, at, now).await?;
        }
        match store.append(&record, expected).await {
            Ok(seq) => {
                if let Some((old, _)) = &existing {
                    if let Some(old_at) = old.next_action_ms(0) {
                        if bucket_of(old_at) != bucket_of(at) {
                            store.remove_due(&alarm.id, old_at, seq).await?;
                        }
                    }
                }
                return Ok(json!({
                    "id": alarm.id,
                    "seq": seq,
                    "due_ms": alarm.due_ms,
                    "replaced": existing.is_some(),
                }));
            }
            Err(Error::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Conflict(alarm.id).into())
}

/// Sets (or replaces) up to [`MAX_SET_MANY`] alarms in one request, each as `set` does
/// and all at once: what a client pipelining single sets gets, without a request and
/// an answer per alarm. Each alarm is answered in its place, set or refused on its own
/// (an id given twice is refused the second time: which of the two stood would depend
/// on which write came first); a request that does not parse sets nothing.
async fn set_many(store: &Store, clock: &Clock, r: SetManyRequest) -> Result<Value, Refusal> {
    if r.alarms.is_empty() || r.alarms.len() > MAX_SET_MANY {
        return Err(Refusal::new(
            ErrorCode::InvalidAlarm,
            format!("alarms: 1-{MAX_SET_MANY} alarms ({} given)", r.alarms.len()),
        ));
    }
    let _turn = SET_MANY_TURNS
        .acquire()
        .await
        .map_err(|e| Refusal::new(ErrorCode::Unavailable, e.to_string()))?;
    let mut seen = std::collections::HashSet::new();
    let sets = r.alarms.into_iter().map(|alarm| {
        let twice = !seen.insert(alarm.id.clone());
        async move {
            let id = alarm.id.clone();
            let done = if twice {
                Err(Refusal::new(
                    ErrorCode::InvalidAlarm,
                    "id: given twice in one request",
                ))
            } else {
                set(store, clock, alarm).await
            };
            done.unwrap_or_else(|refusal| {
                json!({
                    "id": id,
                    "error": {"code": refusal.code.as_str(), "message": refusal.message},
                })
            })
        }
    });
    let results = futures::future::join_all(sets).await;
    Ok(json!({ "results": results }))
}

async fn cancel(store: &Store, clock: &Clock, id: &str) -> Result<Value, Refusal> {
    check_id(id)?;
    for _ in 0..3 {
        let Some((record, seq)) = store.read(id).await? else {
            return Err(Refusal::new(ErrorCode::NotFound, format!("no alarm {id}")));
        };
        let Some(cancelled) = record.cancelled(clock()) else {
            return Ok(json!({ "id": id, "cancelled": false, "status": record.status }));
        };
        match store.append(&cancelled, seq).await {
            Ok(cancelled_seq) => {
                if let Some(at) = record.next_action_ms(0) {
                    store.remove_due(id, at, cancelled_seq).await?;
                }
                return Ok(json!({ "id": id, "cancelled": true, "status": cancelled.status }));
            }
            Err(Error::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Conflict(id.to_string()).into())
}

async fn get(store: &Store, id: &str) -> Result<Value, Refusal> {
    check_id(id)?;
    // The state is the last record, read as such; the history is bounded.
    let Some((last, _)) = store.read(id).await? else {
        return Err(Refusal::new(ErrorCode::NotFound, format!("no alarm {id}")));
    };
    let (history, foreign) = store.history(id, MAX_HISTORY + 1).await?;
    let truncated = history.len() > MAX_HISTORY;
    Ok(json!({
        "id": id,
        "alarm": last.alarm,
        "status": last.status,
        "history": history.iter().take(MAX_HISTORY).map(|(r, seq)| json!({"seq": seq, "event": r.event, "status": r.status})).collect::<Vec<_>>(),
        "history_truncated": truncated,
        // Messages on the alarm's subject that are none of its records (skipped).
        "foreign": foreign,
    }))
}

async fn list(store: &Store, r: ListRequest) -> Result<Value, Refusal> {
    if r.to_ms < r.from_ms || r.to_ms - r.from_ms > MAX_LIST_RANGE_MS {
        return Err(Refusal::new(
            ErrorCode::InvalidRange,
            format!("from_ms <= to_ms, at most {MAX_LIST_RANGE_MS} ms apart"),
        ));
    }
    let limit = r.limit.unwrap_or(MAX_LIST).clamp(1, MAX_LIST);
    let partitions: Vec<u32> = (0..PARTITIONS).collect();
    let mut entries = store
        .load(&partitions, bucket_of(r.from_ms)..=bucket_of(r.to_ms))
        .await?;
    // Earliest first by the index; each record then decides.
    entries.sort_by(|a, b| (a.at_ms, &a.id).cmp(&(b.at_ms, &b.id)));
    entries.dedup_by(|a, b| a.id == b.id);
    let mut out = Vec::new();
    let mut truncated = false;
    for e in entries {
        let Some((rec, _)) = store.read(&e.id).await? else {
            continue;
        };
        let Some(next) = rec.next_action_ms(0) else {
            continue;
        };
        if next < r.from_ms || next > r.to_ms {
            continue;
        }
        if r.target.as_ref().is_some_and(|t| *t != rec.alarm.target) {
            continue;
        }
        if out.len() == limit {
            truncated = true;
            break;
        }
        out.push(json!({
            "id": e.id, "next_ms": next, "due_ms": rec.alarm.due_ms,
            "target": rec.alarm.target, "status": rec.status,
        }));
    }
    out.sort_by_key(|v| v["next_ms"].as_u64());
    Ok(json!({ "alarms": out, "truncated": truncated }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NameRequest {
    name: String,
}

/// How far ahead an add or an activation plans a job's ticks itself (the loaders'
/// planning rounds go on from there).
const PLAN_AHEAD_MS: u64 = 20_000;

/// How many next ticks `cron get` and `cron add` show.
const SHOWN_TICKS: usize = 5;

/// Answers one cron-job request of operation `op`.
pub async fn handle_cron(
    store: &Store,
    clock: &Clock,
    op: &str,
    body: &[u8],
) -> Result<Value, Refusal> {
    if body.len() > MAX_REQUEST {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("request over {MAX_REQUEST} bytes"),
        ));
    }
    match op {
        "add" => add_job(store, clock, parse(body)?).await,
        "delete" | "activate" | "deactivate" | "get" => {
            let r: NameRequest = parse(body)?;
            let name = JobName::new(r.name.clone())
                .map_err(|e| Refusal::new(ErrorCode::InvalidAlarm, format!("name: {e}")))?;
            match op {
                "get" => get_job(store, clock, name.as_str()).await,
                "delete" => change_job(store, clock, name.as_str(), None).await,
                "activate" => change_job(store, clock, name.as_str(), Some(true)).await,
                _ => change_job(store, clock, name.as_str(), Some(false)).await,
            }
        }
        "list" => {
            if !body.iter().all(u8::is_ascii_whitespace) {
                let _: serde_json::Map<String, Value> = parse(body)?;
            }
            list_jobs(store).await
        }
        other => Err(Refusal::new(
            ErrorCode::Malformed,
            format!("unknown operation {other:?}: add, delete, activate, deactivate, get, list"),
        )),
    }
}

/// The next `n` ticks of `job` after `now`, as JSON (UTC ms and the local wall time).
fn next_ticks(job: &CronJob, now: u64, n: usize) -> Value {
    let Ok(schedule) = job.schedule() else {
        return Value::Null;
    };
    let ticks: Vec<Value> = schedule
        .ticks_after(i64::try_from(now).unwrap_or(i64::MAX))
        .take(n)
        .map(|t| json!({ "utc_ms": t.utc_ms, "local": t.local.to_string() }))
        .collect();
    Value::Array(ticks)
}

async fn add_job(store: &Store, clock: &Clock, mut job: CronJob) -> Result<Value, Refusal> {
    let now = clock();
    job.created_ms = now;
    job.validate(store.subjects())
        .map_err(|e| Refusal::new(ErrorCode::InvalidAlarm, e.to_string()))?;
    for _ in 0..3 {
        let existing = store.job(&job.name).await?;
        let replaced = existing.as_ref().is_some_and(|(j, _)| j.job.is_some());
        let expected = existing.map_or(0, |(_, s)| s);
        let stored = StoredJob {
            v: 1,
            job: Some(job.clone()),
            at_ms: now,
        };
        match store.put_job(&job.name, &stored, expected).await {
            Ok(_) => {
                // A replaced job plans from now: the old one's gap is no missed run.
                restart_planning(store, &job.name, now).await?;
                // Its first ticks are alarms at once, not at the next planning round.
                if job.active {
                    crate::jobs::plan_into(store, &job, now, now + PLAN_AHEAD_MS).await?;
                }
                return Ok(json!({
                    "name": job.name,
                    "replaced": replaced,
                    "next": next_ticks(&job, now, SHOWN_TICKS),
                }));
            }
            Err(Error::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Conflict(job.name).into())
}

/// Makes job `name` plan its ticks from `now` on (after an add or an activation:
/// the time it was absent or inactive is not a missed run).
async fn restart_planning(store: &Store, name: &str, now: u64) -> Result<(), Refusal> {
    for _ in 0..3 {
        // A job never planned plans from its creation anyway.
        let Some((_, expected)) = store.planned(name).await? else {
            return Ok(());
        };
        match store
            .set_planned(name, crate::jobs::Planned { tick_ms: now }, expected)
            .await
        {
            Ok(_) => return Ok(()),
            Err(Error::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Conflict(name.to_string()).into())
}

/// Deletes (`active` none) or (de)activates a job.
async fn change_job(
    store: &Store,
    clock: &Clock,
    name: &str,
    active: Option<bool>,
) -> Result<Value, Refusal> {
    for _ in 0..3 {
        let Some((
            StoredJob {
                job: Some(mut job), ..
            },
            seq,
        )) = store.job(name).await?
        else {
            return Err(Refusal::new(
                ErrorCode::NotFound,
                format!("no cron job {name}"),
            ));
        };
        let stored = match active {
            Some(a) => {
                job.active = a;
                StoredJob {
                    v: 1,
                    job: Some(job),
                    at_ms: clock(),
                }
            }
            None => StoredJob {
                v: 1,
                job: None,
                at_ms: clock(),
            },
        };
        match store.put_job(name, &stored, seq).await {
            Ok(_) => {
                if active == Some(true) {
                    let now = clock();
                    restart_planning(store, name, now).await?;
                    if let Some(job) = &stored.job {
                        crate::jobs::plan_into(store, job, now, now + PLAN_AHEAD_MS).await?;
                    }
                }
                return Ok(json!({
                    "name": name,
                    "deleted": stored.job.is_none(),
                    "active": stored.job.as_ref().map(|j| j.active),
                }));
            }
            Err(Error::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Conflict(name.to_string()).into())
}

async fn get_job(store: &Store, clock: &Clock, name: &str) -> Result<Value, Refusal> {
    let Some((StoredJob { job: Some(job), .. }, _)) = store.job(name).await? else {
        return Err(Refusal::new(
            ErrorCode::NotFound,
            format!("no cron job {name}"),
        ));
    };
    let planned = store.planned(name).await?.map(|(p, _)| p.tick_ms);
    Ok(json!({
        "job": job,
        "last_planned_ms": planned,
        "last_planned_alarm": planned.map(|t| CronJob::tick_alarm_id(name, t)),
        "next": next_ticks(&job, clock(), SHOWN_TICKS),
    }))
}

async fn list_jobs(store: &Store) -> Result<Value, Refusal> {
    let partitions: Vec<u32> = (0..PARTITIONS).collect();
    let mut jobs: Vec<CronJob> = store
        .jobs(&partitions)
        .await?
        .into_iter()
        .filter_map(|s| s.job)
        .collect();
    jobs.sort_by(|a, b| a.name.cmp(&b.name));
    let out: Vec<Value> = jobs
        .iter()
        .map(|j| json!({ "name": j.name, "schedule": j.schedule, "tz": j.tz, "active": j.active, "target": j.target }))
        .collect();
    Ok(json!({ "jobs": out }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size<'a, F>(_f: fn(&'a Store, &'a Clock, &'a str, &'a [u8]) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every request is a task holding this future: the rare paths (a whole history
    /// read, a window) are boxed so that a set's stays small (it was 8.6 KB, moved by
    /// tokio at spawn and completion: a tenth of a flooded loader's CPU).
    #[test]
    fn a_requests_future_stays_small() {
        let bytes = size(handle);
        assert!(bytes <= 4096, "handle's future is {bytes} bytes");
    }
}
