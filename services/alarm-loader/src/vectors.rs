//! The golden vectors of `schemas/alarm-vectors.json`: the alarm-loader's records
//! (schemas/alarms.md) computed by this crate from fixed inputs: partitions, buckets
//! and stored subjects, firing and tick ids, alarm histories through realistic lives
//! (the JSON of every status and event), a cron job with every field and its plan
//! under each missed-run policy, retry backoff, and ticks across daylight-saving
//! changes. `cargo run -p alarm-loader --example alarm_vectors` prints them; a test
//! compares them with the committed file. `schemas/python/check_alarm_vectors.py`
//! recomputes them from schemas/alarms.md alone.

use serde_json::{json, Value};

use crate::alarm::{bucket_of, partition_of, Alarm, Record, RetryPolicy, Target, BUCKET_MS};
use crate::cron::{self, JobName};
use crate::jobs::{CronJob, Planned, StoredJob, MAX_TICKS_A_ROUND, MISSED_AFTER_MS};
use crate::store::DueEntry;
use crate::{Error, Result};

/// 2026-03-08T07:00:00Z, the spring-forward instant of America/New_York in 2026: the
/// base of the vectors' times.
const T0: u64 = 1_772_953_200_000;

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Invalid(e.to_string()))
}

/// The firing key of the vectors (a deployment's is secret and random): bytes 0..32.
fn vector_key_bytes() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

fn vector_key() -> crate::alarm::FiringKey {
    crate::alarm::FiringKey::new(vector_key_bytes())
}

/// Computes the vectors document.
pub fn compute() -> Result<Value> {
    let subjects = journal::subjects::Subjects::default();
    Ok(json!({
        "about": "golden vectors of schemas/alarms.md, computed by services/alarm-loader/src/vectors.rs; checked independently by schemas/python/check_alarm_vectors.py",
        "prefix": subjects.prefix(),
        "firing_key_hex": hex::encode(vector_key_bytes()),
        "constants": {
            "partitions": crate::alarm::PARTITIONS,
            "bucket_ms": BUCKET_MS,
            "missed_after_ms": MISSED_AFTER_MS,
            "max_ticks_a_round": MAX_TICKS_A_ROUND,
        },
        "partitions": partitions(),
        "buckets": buckets(),
        "due_index": due_index(&subjects)?,
        "cron_subjects": cron_subjects(&subjects),
        "tick_ids": tick_ids()?,
        "tick_id_parse": tick_id_parse(),
        "backoff": backoff(),
        "lives": lives()?,
        "cron_jobs": cron_jobs()?,
        "dst": dst()?,
    }))
}

/// Ids for the partition function, edge ones included.
fn ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "a",
        "Z",
        "0",
        "-",
        "_",
        "alarm-1",
        "alarm-2",
        "hello-1",
        "a_b-c",
        "--__--",
        "order_42-reminder",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        "cron-backup-1772953200000",
        "backup",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ids.push("x".repeat(128));
    ids.push(format!("{}-_", "9".repeat(126)));
    ids
}

fn partitions() -> Vec<Value> {
    ids()
        .iter()
        .map(|id| json!({"id": id, "partition": partition_of(id)}))
        .collect()
}

fn buckets() -> Vec<Value> {
    [
        0,
        1,
        BUCKET_MS - 1,
        BUCKET_MS,
        BUCKET_MS + 1,
        T0 - 1,
        T0,
        T0 + 9_999,
        T0 + 10_000,
        4_102_444_800_000,
    ]
    .iter()
    .map(|&ms| json!({"ms": ms, "bucket": bucket_of(ms)}))
    .collect()
}

fn due_index(subjects: &journal::subjects::Subjects) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, id) in ids().iter().enumerate().take(8) {
        let at_ms = T0 + 3_337 * i as u64;
        let (p, b) = (partition_of(id), bucket_of(at_ms));
        let entry = DueEntry {
            id: id.clone(),
            at_ms,
            written_ms: T0 - 60_000,
            seq: 0,
        };
        out.push(json!({
            "id": id,
            "at_ms": at_ms,
            "partition": p,
            "bucket": b,
            "due_subject": subjects.alarm_due(p, b, id),
            "due_bucket_filter": subjects.alarm_due_bucket(p, b),
            "entry": to_json(&entry)?,
            "record_subject": subjects.alarm_record(id),
            "swept_subject": subjects.alarm_swept(p),
            "swept_payload": b.saturating_sub(1).to_string(),
        }));
    }
    Ok(out)
}

fn cron_subjects(subjects: &journal::subjects::Subjects) -> Vec<Value> {
    ["backup", "a", "nightly_report-v2", "Z9"]
        .iter()
        .map(|name| {
            let p = partition_of(name);
            json!({
                "name": name,
                "partition": p,
                "job_subject": subjects.cron_job(p, name),
                "tick_subject": subjects.cron_tick(p, name),
            })
        })
        .collect()
}

fn tick_ids() -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (name, ms) in [
        ("backup", T0 as i64),
        ("a", 0),
        ("nightly_report-v2", 1_793_512_800_000),
        ("x-1", 1),
        ("old", -1_000),
    ] {
        let job = JobName::new(name)?;
        let id = cron::tick_id(&job, ms);
        let (back, back_ms) = cron::parse_tick_id(&id)?;
        let alarm_id = u64::try_from(ms)
            .ok()
            .map(|ms| CronJob::tick_alarm_id(name, ms));
        out.push(json!({
            "job": name,
            "tick_ms": ms,
            "tick_id": id,
            "parsed": {"job": back.as_str(), "tick_ms": back_ms},
            "alarm_id": alarm_id,
        }));
    }
    Ok(out)
}

fn tick_id_parse() -> Vec<Value> {
    [
        "backup-1772953200000",
        "old--1000",
        "a-b-0",
        "backup-",
        "backup",
        "-1000",
        "backup-01",
        "backup-+1",
        "back.up-1",
        "backup---1",
        "99999999999999999999",
        "a-99999999999999999999",
    ]
    .iter()
    .map(|id| {
        let parsed = cron::parse_tick_id(id)
            .ok()
            .map(|(job, ms)| json!({"job": job.as_str(), "tick_ms": ms}));
        json!({"id": id, "parsed": parsed})
    })
    .collect()
}

fn backoff() -> Vec<Value> {
    let policies = [
        (RetryPolicy::default(), vec![1, 2, 3, 4, 5, 6, 7, 8, 100]),
        (
            RetryPolicy {
                attempts: 3,
                backoff_ms: 1_000,
                max_backoff_ms: 1_500,
            },
            vec![1, 2, 3],
        ),
        (
            RetryPolicy {
                attempts: 1000,
                backoff_ms: 1,
                max_backoff_ms: 1 << 63,
            },
            vec![1, 2, 40, 41, 42, 60, 1000],
        ),
        (
            RetryPolicy {
                attempts: 10,
                backoff_ms: 700,
                max_backoff_ms: 700,
            },
            vec![1, 2, 10],
        ),
        (
            RetryPolicy {
                attempts: 1000,
                backoff_ms: 1 << 40,
                max_backoff_ms: u64::MAX,
            },
            vec![1, 24, 25, 26, 1000],
        ),
    ];
    policies
        .iter()
        .map(|(p, attempts)| {
            let delays: Vec<Value> = attempts
                .iter()
                .map(|&a| json!({"attempt": a, "delay_ms": p.delay_after(a)}))
                .collect();
            json!({"retry": p, "delays": delays})
        })
        .collect()
}

/// An alarm's history as stored: each record at its stream sequence.
struct Life {
    name: &'static str,
    about: &'static str,
    stored: Vec<(u64, Record)>,
}

impl Life {
    fn new(name: &'static str, about: &'static str) -> Life {
        Life {
            name,
            about,
            stored: Vec::new(),
        }
    }

    /// The record as a reader has it: a set record's `set_seq` is its own sequence.
    fn current(&self) -> Result<Record> {
        let (seq, r) = self
            .stored
            .last()
            .ok_or_else(|| Error::Invalid(format!("{}: no record yet", self.name)))?;
        let mut r = r.clone();
        if r.set_seq == 0 {
            r.set_seq = *seq;
        }
        Ok(r)
    }

    fn push(&mut self, seq: u64, r: Option<Record>) -> Result<Record> {
        let r = r.ok_or_else(|| Error::Invalid(format!("{}: step refused", self.name)))?;
        self.stored.push((seq, r));
        self.current()
    }

    fn doc(&self) -> Result<Value> {
        let mut records = Vec::new();
        for (i, (seq, r)) in self.stored.iter().enumerate() {
            let mut read = r.clone();
            if read.set_seq == 0 {
                read.set_seq = *seq;
            }
            records.push(json!({
                "seq": seq,
                "record": to_json(r)?,
                "firing_id": read.firing_id(&vector_key()),
                "final": read.status.is_final(),
                "next_action_ms": read.next_action_ms(2_000),
                "index": i,
            }));
        }
        Ok(json!({"name": self.name, "about": self.about, "grace_ms": 2_000, "records": records}))
    }
}

fn lives() -> Result<Vec<Value>> {
    let due = T0;
    let process_alarm = Alarm {
        id: "invoice-42".into(),
        due_ms: due,
        target: Target::Process("billing".into()),
        body: b"send invoice 42".to_vec(),
        headers: vec![
            ("content-type".into(), "text/plain".into()),
            ("x-tenant".into(), "acme".into()),
        ],
        dispatch_timeout_ms: 5_000,
        retry: RetryPolicy {
            attempts: 3,
            backoff_ms: 1_000,
            max_backoff_ms: 1_500,
        },
        cron: None,
    };
    let mut out = Vec::new();

    // set → attempt → failed → attempt → delivered (process target).
    let mut l = Life::new(
        "delivered_after_a_failure",
        "process target: set, claimed by loader-a, fails (timeout), claimed again by loader-b after the backoff, delivered into slot 17",
    );
    l.push(101, Some(Record::set(process_alarm.clone(), due - 10_000)))?;
    let r = l.current()?;
    let r = l.push(105, r.claim(due + 20, "loader-a"))?;
    let (f, _) = r.failed(due + 5_030, "timeout: no answer within 5000 ms");
    let r = l.push(109, Some(f))?;
    let at = r.next_action_ms(0).unwrap_or(0) + 3;
    let r = l.push(112, r.claim(at, "loader-b"))?;
    l.push(113, Some(r.delivered(at + 11, Some(17), false)))?;
    out.push(l.doc()?);

    // A claim taken over, then failures until dead (subject target).
    let subject_alarm = Alarm {
        id: "ping_worker".into(),
        due_ms: due + 60_000,
        target: Target::Subject("jobs.ping".into()),
        body: Vec::new(),
        headers: Vec::new(),
        dispatch_timeout_ms: 2_000,
        retry: RetryPolicy {
            attempts: 2,
            backoff_ms: 500,
            max_backoff_ms: 500,
        },
        cron: None,
    };
    let mut l = Life::new(
        "dead_after_every_attempt",
        "subject target, 2 attempts: loader-a claims and dies, loader-b takes the claim over after its dispatch timeout and grace (the same attempt), it fails, the second attempt fails: dead-lettered",
    );
    l.push(200, Some(Record::set(subject_alarm.clone(), due)))?;
    let r = l.current()?;
    let r = l.push(201, r.claim(due + 60_000, "loader-a"))?;
    let take = r.next_action_ms(2_000).unwrap_or(0);
    let r = l.push(230, r.claim(take, "loader-b"))?;
    let (f, _) = r.failed(take + 4, "no responders");
    let r = l.push(231, Some(f))?;
    let at = r.next_action_ms(0).unwrap_or(0);
    let r = l.push(240, r.claim(at, "loader-b"))?;
    let (f, _) = r.failed(at + 2_000, "error: disk full");
    l.push(241, Some(f))?;
    out.push(l.doc()?);

    // retry asked with a new body: a new firing.
    let mut l = Life::new(
        "retry_asked_with_a_new_body",
        "subject target: the responder answers retry in 2000 ms with a new body (a new firing: due time and body change, attempts start over), then ok",
    );
    l.push(
        300,
        Some(Record::set(
            Alarm {
                id: "poll-7".into(),
                body: b"v1".to_vec(),
                ..subject_alarm.clone()
            },
            due,
        )),
    )?;
    let r = l.current()?;
    let r = l.push(301, r.claim(due + 60_005, "loader-a"))?;
    let r = l.push(
        302,
        Some(r.retry_asked(due + 60_040, 2_000, Some(b"v2".to_vec()))),
    )?;
    let r = l.push(303, r.claim(due + 62_045, "loader-a"))?;
    l.push(304, Some(r.delivered(due + 62_050, None, false)))?;
    out.push(l.doc()?);

    // Set in the past, replaced, cancelled.
    let mut l = Life::new(
        "replaced_then_cancelled",
        "set with a due time already past (pending from the set's time), replaced by a new set (a new set_seq: a new firing), then cancelled by a client",
    );
    l.push(
        400,
        Some(Record::set(
            Alarm {
                id: "reminder_x".into(),
                due_ms: due - 3_600_000,
                ..process_alarm.clone()
            },
            due,
        )),
    )?;
    l.push(
        410,
        Some(Record::set(
            Alarm {
                id: "reminder_x".into(),
                due_ms: due + 3_600_000,
                body: Vec::new(),
                headers: Vec::new(),
                ..process_alarm.clone()
            },
            due + 7,
        )),
    )?;
    let r = l.current()?;
    l.push(411, r.cancelled(due + 1_000))?;
    out.push(l.doc()?);

    // Cron ticks: one delivered as a duplicate, one skipped.
    let job = full_job()?;
    let tick = T0 + 15 * 60_000;
    let process_job = CronJob {
        target: Target::Process("reports".into()),
        strategy: crate::jobs::Strategy::One,
        overlap: crate::jobs::Overlap::Allow,
        ..job.clone()
    };
    let mut l = Life::new(
        "cron_tick_delivered_as_a_duplicate",
        "the alarm of a cron tick into a process: claimed; the scheduler answers that the firing was already in the log (a retried attempt that had landed)",
    );
    l.push(
        500,
        Some(Record::set(
            process_job.tick_alarm(tick, None),
            tick - 50_000,
        )),
    )?;
    let r = l.current()?;
    let r = l.push(501, r.claim(tick + 1, "loader-a"))?;
    l.push(502, Some(r.delivered(tick + 9, Some(3), true)))?;
    out.push(l.doc()?);

    let mut l = Life::new(
        "cron_tick_skipped",
        "the alarm of a cron tick of a job with overlap skip and strategy all (it names the previous tick's alarm and the worker group), skipped because the previous execution has not finished",
    );
    l.push(
        600,
        Some(Record::set(
            job.tick_alarm(tick + 900_000, Some(tick)),
            tick,
        )),
    )?;
    let r = l.current()?;
    l.push(
        601,
        r.skipped(
            tick + 900_000,
            "overlap: the previous tick cron-nightly_report-v2-1772954100000 is not finished",
        ),
    )?;
    out.push(l.doc()?);
    Ok(out)
}

/// A cron job with every field set.
fn full_job() -> Result<CronJob> {
    serde_json::from_value(json!({
        "name": "nightly_report-v2",
        "schedule": "@every 15m",
        "tz": "America/New_York",
        "active": true,
        "overlap": "skip",
        "strategy": {"all": "report-workers"},
        "missed": "all",
        "missed_bound": 3,
        "dst_gap": "skip",
        "dst_fold": "twice",
        "target": {"subject": "reports.run"},
        "body": "eyJraW5kIjoibmlnaHRseSJ9",
        "headers": [["content-type", "application/json"]],
        "dispatch_timeout_ms": 30000,
        "retry": {"attempts": 4, "backoff_ms": 2000, "max_backoff_ms": 10000},
        "created_ms": T0 - 7 * 60_000 - 123,
    }))
    .map_err(|e| Error::Invalid(e.to_string()))
}

fn plans(job: &CronJob, cases: &[(Option<u64>, u64, u64)]) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for policy in ["skip", "latest", "all"] {
        let j = CronJob {
            missed: policy.into(),
            ..job.clone()
        };
        for &(last, now, horizon) in cases {
            let (ticks, dropped) = j.plan(last, now, horizon)?;
            out.push(json!({
                "missed": policy,
                "last": last,
                "now": now,
                "horizon": horizon,
                "ticks": ticks,
                "dropped": dropped,
            }));
        }
    }
    Ok(out)
}

fn cron_jobs() -> Result<Vec<Value>> {
    let job = full_job()?;
    let created = job.created_ms;
    let period = 15 * 60_000;
    // Last planned: the second tick; back 5 periods and 7 minutes later.
    let last = created + 2 * period;
    let now = last + 5 * period + 7 * 60_000;
    let every_cases = [
        (Some(last), now, now + 40 * 60_000),
        (None, created + 25 * 60_000, created + 70 * 60_000),
        (Some(last), last + period, last + period),
        (Some(last + 4 * period), now, now + period),
        (Some(last), last + 9 * period - 1, last + 9 * period + 1),
    ];
    let daily: CronJob = serde_json::from_value(json!({
        "name": "backup",
        "schedule": "30 2 * * *",
        "tz": "America/New_York",
        "missed_bound": 3,
        "target": {"process": "ops"},
        "created_ms": 1_772_323_200_000u64,
    }))
    .map_err(|e| Error::Invalid(e.to_string()))?;
    // Last planned 2026-03-04 02:30 EST; back on 2026-03-10 at 12:00 UTC.
    let daily_cases = [
        (
            Some(1_772_609_400_000),
            1_773_144_000_000,
            1_773_316_800_000,
        ),
        (None, 1_773_144_000_000, 1_773_316_800_000),
    ];
    let stored = StoredJob {
        v: 1,
        job: Some(job.clone()),
        at_ms: created,
    };
    let tombstone = StoredJob {
        v: 1,
        job: None,
        at_ms: created + 86_400_000,
    };
    let defaults: CronJob = serde_json::from_value(json!({
        "name": "minimal",
        "schedule": "@hourly",
        "target": {"process": "p1"},
    }))
    .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(vec![
        json!({
            "job": to_json(&job)?,
            "stored": to_json(&stored)?,
            "tombstone": to_json(&tombstone)?,
            "planned": to_json(&Planned { tick_ms: last })?,
            "tick_alarm": to_json(&job.tick_alarm(last + period, Some(last)))?,
            "plans": plans(&job, &every_cases)?,
        }),
        json!({
            "job": to_json(&daily)?,
            "tick_alarm": to_json(&daily.tick_alarm(1_772_609_400_000, Some(1_772_523_000_000)))?,
            "plans": plans(&daily, &daily_cases)?,
        }),
        json!({
            "request": {"name": "minimal", "schedule": "@hourly", "target": {"process": "p1"}},
            "job": to_json(&defaults)?,
        }),
    ])
}

fn dst() -> Result<Vec<Value>> {
    // (schedule, zone, gap, fold, after (UTC ms), how many ticks)
    let cases: [(&str, &str, &str, &str, i64, usize); 12] = [
        // 2026-03-06T12:00Z: New York springs forward on 2026-03-08 at 02:00.
        (
            "30 2 * * *",
            "America/New_York",
            "shift",
            "once",
            1_772_798_400_000,
            4,
        ),
        (
            "30 2 * * *",
            "America/New_York",
            "skip",
            "once",
            1_772_798_400_000,
            4,
        ),
        (
            "0 */30 * * * *",
            "America/New_York",
            "shift",
            "once",
            1_772_949_600_000,
            4,
        ),
        (
            "*/20 2 * * *",
            "America/New_York",
            "shift",
            "once",
            1_772_949_600_000,
            4,
        ),
        // 2026-10-30T12:00Z: New York falls back on 2026-11-01 at 02:00.
        (
            "30 1 * * *",
            "America/New_York",
            "shift",
            "once",
            1_793_361_600_000,
            4,
        ),
        (
            "30 1 * * *",
            "America/New_York",
            "shift",
            "twice",
            1_793_361_600_000,
            4,
        ),
        (
            "0,30 1 * * *",
            "America/New_York",
            "shift",
            "twice",
            1_793_509_199_000,
            5,
        ),
        (
            "0,30 1 * * *",
            "America/New_York",
            "shift",
            "once",
            1_793_509_199_000,
            3,
        ),
        // Berlin: 2026-03-29 02:00 → 03:00.
        (
            "30 2 * * *",
            "Europe/Berlin",
            "shift",
            "once",
            1_774_699_200_000,
            3,
        ),
        // Lord Howe, a 30-minute change: 2026-04-05 02:00 → 01:30 (from 2026-04-02T12:00Z)
        // and 2026-10-04 02:00 → 02:30 (from 2026-10-01T12:00Z).
        (
            "15 2 * * *",
            "Australia/Lord_Howe",
            "shift",
            "once",
            1_790_856_000_000,
            4,
        ),
        (
            "45 1 * * *",
            "Australia/Lord_Howe",
            "shift",
            "twice",
            1_775_131_200_000,
            5,
        ),
        ("0 0 12 * * *", "UTC", "skip", "once", T0 as i64, 2),
    ];
    let mut out = Vec::new();
    for (expr, tz, gap, fold, after, n) in cases {
        let schedule = cron::Schedule::parse(expr)?
            .in_zone(cron::zone(tz)?)
            .with_dst(cron::DstPolicy {
                gap: gap.parse()?,
                fold: fold.parse()?,
            });
        let ticks: Vec<Value> = schedule
            .ticks_after(after)
            .take(n)
            .map(|t| {
                json!({
                    "utc_ms": t.utc_ms,
                    "local": t.local.to_string(),
                    "offset_seconds": t.offset.seconds(),
                    "kind": t.kind.as_str(),
                })
            })
            .collect();
        out.push(json!({
            "schedule": expr,
            "tz": tz,
            "dst_gap": gap,
            "dst_fold": fold,
            "after_ms": after,
            "ticks": ticks,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_alarm_vectors_match_the_code() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../schemas/alarm-vectors.json"
        );
        let text = std::fs::read_to_string(path).expect("schemas/alarm-vectors.json exists");
        let committed: Value = serde_json::from_str(&text).expect("valid JSON");
        let computed = compute().unwrap();
        assert_eq!(
            committed, computed,
            "regenerate with `cargo run -p alarm-loader --example alarm_vectors > schemas/alarm-vectors.json` only if the format changed on purpose"
        );
    }

    #[test]
    fn every_committed_record_decodes_and_every_life_covers_each_event_and_status() {
        let committed = compute().unwrap();
        let mut events = std::collections::BTreeSet::new();
        let mut statuses = std::collections::BTreeSet::new();
        for life in committed["lives"].as_array().unwrap() {
            for r in life["records"].as_array().unwrap() {
                let bytes = serde_json::to_vec(&r["record"]).unwrap();
                let rec = Record::decode(&bytes, "vectors", 1).unwrap();
                assert_eq!(to_json(&rec).unwrap(), r["record"]);
                events.insert(r["record"]["event"]["event"].as_str().unwrap().to_string());
                statuses.insert(
                    r["record"]["status"]["status"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                );
            }
        }
        let want = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            events,
            want(&[
                "attempt",
                "cancelled",
                "dead_lettered",
                "delivered",
                "failed",
                "retry_asked",
                "set",
                "skipped"
            ])
        );
        assert_eq!(
            statuses,
            want(&[
                "cancelled",
                "dead",
                "dispatching",
                "done",
                "pending",
                "skipped"
            ])
        );
    }
}
