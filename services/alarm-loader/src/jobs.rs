//! Cron jobs (schemas/alarms.md, "Cron jobs"): a job is a stored definition; each of
//! its ticks becomes an alarm with the id `cron-<job>-<tick ms>`, created only if absent,
//! so every tick is one execution for the whole cluster whatever number of loaders
//! plans it, and fires, retries, dead-letters and keeps its history as any alarm does.
//!
//! The loader that holds a job's partition plans it: every `in_memory_interval` it makes
//! the ticks up to the window's end into alarms and records the last one
//! (`…alarms.crontick.<p>.<job>`, compare-and-set). Ticks that fell while nothing
//! planned them are found from that record and handled by the job's missed-run policy.
//! At fire time a tick's alarm is skipped (recorded, not fired) when its job was
//! deleted or deactivated, when the previous execution has not finished and the job
//! does not allow overlap, or when it is late and the missed-run policy says so.

use serde::{Deserialize, Serialize};

use crate::alarm::{Alarm, CronTick, Record, RetryPolicy, Target};
use crate::cron::{self, DstPolicy, JobName, MissedPolicy, Schedule};
use crate::store::Store;
use crate::{Error, Result};

/// Longest job name (its tick alarms' ids must fit [`crate::alarm::MAX_ID`]).
pub const MAX_NAME: usize = 100;
/// The default grace: a tick later than this after its time counts as missed.
pub const MISSED_AFTER_MS: u64 = 30_000;
/// Most ticks planned for one job in one round.
pub const MAX_TICKS_A_ROUND: usize = 1_000;

/// Overlapping executions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// A tick fires whatever the previous one is doing.
    #[default]
    Allow,
    /// A tick is skipped while the previous execution has not finished (its target
    /// has not answered).
    Skip,
}

/// Where a tick goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// One execution per tick for the whole cluster.
    #[default]
    One,
    /// One per live instance of this worker group (Quantum's broadcast): the instances
    /// answering `$SRV.PING.<group>`, each sent the tick on `<target subject>.<id>`.
    All(String),
}

/// A cron job as a client adds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CronJob {
    /// 1–100 characters of `A-Z a-z 0-9 _ -`, not ending in `-`.
    pub name: String,
    /// Cron expression (6 fields with seconds, or 5), alias, or `@every <duration>`.
    pub schedule: String,
    /// IANA time zone the fields are read in.
    #[serde(default = "utc")]
    pub tz: String,
    /// Whether ticks fire.
    #[serde(default = "yes")]
    pub active: bool,
    /// Overlap rule.
    #[serde(default)]
    pub overlap: Overlap,
    /// Run strategy.
    #[serde(default)]
    pub strategy: Strategy,
    /// Missed-run policy: `skip`, `latest` or `all`.
    #[serde(default = "skip")]
    pub missed: String,
    /// Most missed ticks fired under `all`.
    #[serde(default = "ten")]
    pub missed_bound: u32,
    /// A tick is missed only once it is this late (ms): within it a tick that fell
    /// while no loader planned it (a failover, a short outage) still fires, late.
    #[serde(default = "grace")]
    pub missed_grace_ms: u64,
    /// A wall time that does not exist: `shift` (fire after the gap) or `skip`.
    #[serde(default = "shift")]
    pub dst_gap: String,
    /// A wall time that occurs twice: `once` or `twice`.
    #[serde(default = "once")]
    pub dst_fold: String,
    /// Where each tick goes.
    pub target: Target,
    /// The message body, base64.
    #[serde(default, with = "crate::alarm::b64")]
    pub body: Vec<u8>,
    /// Headers sent with each tick.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// How long a dispatch waits for its answer.
    #[serde(default = "timeout")]
    pub dispatch_timeout_ms: u64,
    /// Retries of a failed tick.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// When the job was added (ms; set by the loader): the anchor of `@every`.
    #[serde(default)]
    pub created_ms: u64,
}

fn utc() -> String {
    "UTC".into()
}
fn yes() -> bool {
    true
}
fn skip() -> String {
    "skip".into()
}
fn ten() -> u32 {
    10
}
fn grace() -> u64 {
    MISSED_AFTER_MS
}
fn shift() -> String {
    "shift".into()
}
fn once() -> String {
    "once".into()
}
fn timeout() -> u64 {
    crate::alarm::DEFAULT_DISPATCH_TIMEOUT_MS
}

/// A stored job: the definition, or a tombstone once deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredJob {
    /// Format version (1).
    pub v: u32,
    /// The job; none once deleted.
    pub job: Option<CronJob>,
    /// When it was last changed (ms).
    pub at_ms: u64,
}

/// The last tick of a job made into an alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planned {
    /// The tick (UTC ms).
    pub tick_ms: u64,
}

impl CronJob {
    /// The schedule with its zone, DST policy and `@every` anchor.
    pub fn schedule(&self) -> Result<Schedule> {
        let dst = DstPolicy {
            gap: self.dst_gap.parse()?,
            fold: self.dst_fold.parse()?,
        };
        Ok(Schedule::parse(&self.schedule)?
            .in_zone(cron::zone(&self.tz)?)
            .with_dst(dst)
            .anchored_at(i64::try_from(self.created_ms).unwrap_or(i64::MAX)))
    }

    /// The missed-run policy.
    pub fn missed_policy(&self) -> Result<MissedPolicy> {
        self.missed.parse()
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self, subjects: &journal::subjects::Subjects) -> Result<()> {
        let named = |field: &str, e: Error| Error::Invalid(format!("{field}: {e}"));
        let name = JobName::new(self.name.clone()).map_err(|e| named("name", e))?;
        if name.as_str().len() > MAX_NAME {
            return Err(Error::Invalid(format!("name: at most {MAX_NAME} bytes")));
        }
        Schedule::parse(&self.schedule).map_err(|e| named("schedule", e))?;
        cron::zone(&self.tz).map_err(|e| named("tz", e))?;
        self.dst_gap
            .parse::<cron::Gap>()
            .map_err(|e| named("dst_gap", e))?;
        self.dst_fold
            .parse::<cron::Fold>()
            .map_err(|e| named("dst_fold", e))?;
        self.schedule().map_err(|e| named("schedule", e))?;
        self.missed_policy().map_err(|e| named("missed", e))?;
        if self.missed_bound == 0 || self.missed_bound > 1000 {
            return Err(Error::Invalid("missed_bound: 1..=1000".into()));
        }
        if let Strategy::All(group) = &self.strategy {
            if !matches!(self.target, Target::Subject(_)) {
                return Err(Error::Invalid(
                    "strategy all: the target must be a subject (each instance gets <subject>.<id>)".into(),
                ));
            }
            if !crate::alarm::is_token(group, 64) {
                return Err(Error::Invalid(
                    "strategy all: group is one token of A-Z a-z 0-9 - _".into(),
                ));
            }
        }
        self.tick_alarm(0, None).validate(subjects)
    }

    /// The id of tick `tick_ms`'s alarm: `cron-<job>-<ms>`.
    pub fn tick_alarm_id(name: &str, tick_ms: u64) -> String {
        format!("{}{name}-{tick_ms}", crate::alarm::RESERVED_ID_PREFIX)
    }

    /// The alarm of tick `tick_ms` (`previous`: the tick before it, if any).
    pub fn tick_alarm(&self, tick_ms: u64, previous: Option<u64>) -> Alarm {
        Alarm {
            id: CronJob::tick_alarm_id(&self.name, tick_ms),
            due_ms: tick_ms,
            target: self.target.clone(),
            body: self.body.clone(),
            headers: self.headers.clone(),
            dispatch_timeout_ms: self.dispatch_timeout_ms,
            retry: self.retry,
            cron: Some(CronTick {
                job: self.name.clone(),
                tick_ms,
                after: match self.overlap {
                    Overlap::Skip => previous.map(|p| CronJob::tick_alarm_id(&self.name, p)),
                    Overlap::Allow => None,
                },
                fan_out: match &self.strategy {
                    Strategy::All(group) => Some(group.clone()),
                    Strategy::One => None,
                },
            }),
        }
    }

    /// The ticks to make into alarms now: after `last` (the last planned tick; none:
    /// the job is new, from its creation) up to `horizon`. Ticks already due (they fell
    /// while nothing planned) follow the missed-run policy; the count of those dropped
    /// is returned beside.
    pub fn plan(&self, last: Option<u64>, now: u64, horizon: u64) -> Result<(Vec<u64>, u64)> {
        let schedule = self.schedule()?;
        let to_i = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX);
        let from = last.unwrap_or(self.created_ms);
        let mut out = Vec::new();
        let mut dropped = 0;
        // Ticks later than the grace are missed; those within it are planned (late).
        let missed_before = now.saturating_sub(self.missed_grace_ms);
        let mut from = from;
        if from < missed_before {
            let m = cron::missed(
                &schedule,
                to_i(from),
                to_i(missed_before),
                self.missed_policy()?,
                self.missed_bound as usize,
            );
            // A new job has missed nothing: its ticks before now were never due to it.
            if last.is_some() {
                out.extend(m.fire.iter().filter_map(|t| u64::try_from(t.utc_ms).ok()));
                dropped = match m.dropped {
                    cron::Count::Exact(n) | cron::Count::AtLeast(n) => n,
                };
            }
            from = missed_before;
        }
        for t in schedule.ticks_after(to_i(from)) {
            let Ok(t) = u64::try_from(t.utc_ms) else {
                break;
            };
            if t > horizon || out.len() >= MAX_TICKS_A_ROUND {
                break;
            }
            out.push(t);
        }
        Ok((out, dropped))
    }

    /// Whether `tick_ms` is a tick of this job's schedule.
    pub fn is_tick(&self, tick_ms: u64) -> bool {
        let Ok(schedule) = self.schedule() else {
            return false;
        };
        let Ok(t) = i64::try_from(tick_ms) else {
            return false;
        };
        schedule
            .next_after(t.saturating_sub(1))
            .is_some_and(|next| next.utc_ms == t)
    }

    /// Why a tick due at `tick_ms` is not fired at `now`, if it is not: it is late
    /// beyond the job's grace and the policy is `skip`, or `latest` and a later tick
    /// is due too.
    pub fn late_rule(&self, tick_ms: u64, now: u64) -> Option<String> {
        let late = now.saturating_sub(tick_ms);
        if late <= self.missed_grace_ms {
            return None;
        }
        match self.missed_policy().ok()? {
            MissedPolicy::Skip => Some(format!("missed: {late} ms late (missed-run policy skip)")),
            MissedPolicy::Latest => {
                let next = self
                    .schedule()
                    .ok()?
                    .next_after(i64::try_from(tick_ms).ok()?)?;
                let next = u64::try_from(next.utc_ms).ok()?;
                (next <= now).then(|| {
                    "missed: a later tick is due too (missed-run policy latest)".to_string()
                })
            }
            MissedPolicy::All => None,
        }
    }
}

/// Makes `job`'s ticks up to `horizon` into alarms (each created only if absent: the
/// same tick planned twice, by two loaders or by an add and a loader, is one alarm)
/// and records the last one planned (compare-and-set; a lost race means another
/// planner did it). Returns how many ticks were missed (dropped by the policy).
pub async fn plan_into(store: &Store, job: &CronJob, now: u64, horizon: u64) -> Result<u64> {
    let planned = store.planned(&job.name).await?;
    // A job replaced after it was planned starts again from its new creation.
    let last = planned
        .map(|(p, _)| p.tick_ms)
        .filter(|&t| t >= job.created_ms);
    let (ticks, dropped) = job.plan(last, now, horizon)?;
    let mut previous = last;
    for &tick in &ticks {
        let alarm = job.tick_alarm(tick, previous);
        previous = Some(tick);
        // Pending from the later of the tick and now (Record::set).
        let record = Record::set(alarm, now);
        let at = tick.max(now);
        store.put_due(&record.alarm.id, at, now).await?;
        match store.append(&record, 0).await {
            Ok(_) | Err(Error::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(&tick_ms) = ticks.last() {
        let expected = planned.map_or(0, |(_, s)| s);
        match store
            .set_planned(&job.name, Planned { tick_ms }, expected)
            .await
        {
            Ok(_) | Err(Error::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(schedule: &str) -> CronJob {
        serde_json::from_value(serde_json::json!({
            "name": "backup",
            "schedule": schedule,
            "target": {"process": "p1"},
            "created_ms": 1_000_000,
        }))
        .unwrap()
    }

    #[test]
    fn defaults_are_the_documented_ones_and_unknown_fields_are_refused() {
        let j = job("@every 10s");
        assert_eq!(
            (j.tz.as_str(), j.active, j.overlap),
            ("UTC", true, Overlap::Allow)
        );
        assert_eq!((j.missed.as_str(), j.missed_bound), ("skip", 10));
        assert_eq!(j.missed_grace_ms, MISSED_AFTER_MS);
        assert_eq!(j.strategy, Strategy::One);
        assert!(serde_json::from_value::<CronJob>(serde_json::json!({
            "name": "x", "schedule": "@hourly", "target": {"process": "p"}, "colour": 1
        }))
        .is_err());
        let all: CronJob = serde_json::from_value(serde_json::json!({
            "name": "x", "schedule": "@hourly", "target": {"subject": "w.x"}, "strategy": {"all": "workers"}
        }))
        .unwrap();
        assert_eq!(all.strategy, Strategy::All("workers".into()));
    }

    #[test]
    fn validation_names_the_bad_field() {
        let s = journal::subjects::Subjects::default();
        assert!(job("@every 10s").validate(&s).is_ok());
        let bad = |f: &dyn Fn(&mut CronJob), what: &str| {
            let mut j = job("@every 10s");
            f(&mut j);
            let e = j.validate(&s).unwrap_err().to_string();
            assert!(e.contains(what), "{e} should name {what}");
        };
        bad(&|j| j.name = "a.b".into(), "name");
        bad(&|j| j.name = "x".repeat(101), "name");
        bad(&|j| j.schedule = "61 * * * * *".into(), "field");
        bad(&|j| j.tz = "Mars/Olympus".into(), "time zone");
        bad(&|j| j.missed = "sometimes".into(), "missed");
        bad(&|j| j.dst_gap = "jump".into(), "gap");
        bad(&|j| j.strategy = Strategy::All("g".into()), "strategy all");
        bad(
            &|j| j.target = Target::Subject("ts.log.x".into()),
            "target subject",
        );
    }

    #[test]
    fn a_new_job_plans_from_its_creation_within_the_grace_and_misses_nothing() {
        let j = job("@every 10s");
        // Created at 1,000,000, first planned at 1,025,000 (horizon 1,045,000): the
        // ticks since its creation are late but within the 30 s grace.
        let (ticks, dropped) = j.plan(None, 1_025_000, 1_045_000).unwrap();
        assert_eq!(ticks, [1_010_000, 1_020_000, 1_030_000, 1_040_000]);
        assert_eq!(dropped, 0);
        // First planned long after its creation: nothing older than the grace, and
        // nothing counted as missed (it was never due to run).
        let (ticks, dropped) = j.plan(None, 1_100_000, 1_110_000).unwrap();
        assert_eq!(
            (ticks.as_slice(), dropped),
            (&[1_080_000, 1_090_000, 1_100_000, 1_110_000][..], 0)
        );
    }

    #[test]
    fn ticks_missed_while_nothing_planned_follow_the_policy() {
        let mut j = job("@every 10s");
        // Last planned 1,010,000; back at 1,065,000 (grace 30 s): 1,020,000 and
        // 1,030,000 are missed; 1,040,000 … 1,060,000 are late but within the grace.
        let (ticks, dropped) = j.plan(Some(1_010_000), 1_065_000, 1_075_000).unwrap();
        let within = [1_040_000, 1_050_000, 1_060_000, 1_070_000];
        assert_eq!((ticks.as_slice(), dropped), (&within[..], 2));
        j.missed = "latest".into();
        let (ticks, dropped) = j.plan(Some(1_010_000), 1_065_000, 1_075_000).unwrap();
        assert_eq!(ticks[0], 1_030_000);
        assert_eq!((&ticks[1..], dropped), (&within[..], 1));
        j.missed = "all".into();
        j.missed_bound = 1;
        let (ticks, dropped) = j.plan(Some(1_010_000), 1_065_000, 1_075_000).unwrap();
        assert_eq!(
            (ticks[0], &ticks[1..], dropped),
            (1_030_000, &within[..], 1)
        );
        j.missed_bound = 10;
        // A short grace: everything up to now - 5 s is missed (1,020,000 … 1,060,000).
        j.missed = "skip".into();
        j.missed_grace_ms = 5_000;
        let (ticks, dropped) = j.plan(Some(1_010_000), 1_065_000, 1_075_000).unwrap();
        assert_eq!((ticks.as_slice(), dropped), (&[1_070_000][..], 5));
        // Planned ahead already: nothing new before the horizon moves.
        let (ticks, _) = j.plan(Some(1_070_000), 1_065_000, 1_075_000).unwrap();
        assert!(ticks.is_empty());
    }

    #[test]
    fn a_tick_alarm_names_its_job_and_what_it_waits_for() {
        let mut j = job("@every 10s");
        let a = j.tick_alarm(1_020_000, Some(1_010_000));
        assert_eq!(a.id, "cron-backup-1020000");
        let c = a.cron.unwrap();
        assert_eq!(
            (c.job.as_str(), c.tick_ms, c.after),
            ("backup", 1_020_000, None)
        );
        j.overlap = Overlap::Skip;
        let c = j.tick_alarm(1_020_000, Some(1_010_000)).cron.unwrap();
        assert_eq!(c.after.as_deref(), Some("cron-backup-1010000"));
    }

    #[test]
    fn ticks_of_the_schedule_are_recognised() {
        let j = job("@every 10s");
        assert!(j.is_tick(1_010_000) && j.is_tick(1_020_000));
        assert!(!j.is_tick(1_015_000) && !j.is_tick(1_010_001));
        let h = job("0 0 * * * *");
        assert!(h.is_tick(3_600_000) && !h.is_tick(3_600_000 + 60_000));
    }

    #[test]
    fn late_ticks_follow_the_missed_run_policy() {
        let mut j = job("@every 10s");
        assert_eq!(j.late_rule(1_010_000, 1_010_000 + MISSED_AFTER_MS), None);
        assert!(j.late_rule(1_010_000, 1_100_000).is_some());
        j.missed = "latest".into();
        // 90 s late: later ticks are due too.
        assert!(j.late_rule(1_010_000, 1_100_000).is_some());
        j.missed = "all".into();
        assert_eq!(j.late_rule(1_010_000, 1_100_000), None);
        let mut h = job("@hourly");
        h.missed = "latest".into();
        // 40 s late, the next tick an hour away: it is the latest, it fires.
        assert_eq!(h.late_rule(3_600_000, 3_640_000), None);
    }
}
