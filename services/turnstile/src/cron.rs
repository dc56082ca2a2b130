//! `turnstile cron add|delete|activate|deactivate|get|list`: the alarm-loader's
//! cron-job requests (`<prefix>.cron.<op>`, JSON bodies, schemas/alarms.md, "Cron
//! jobs"); and `turnstile cron next`: the next fire times of an expression (computed
//! here, no server needed) or of a stored job. The request bodies are the loader's own
//! `CronJob`, so the CLI cannot drift from what the loader reads.

use std::io::Write;

use anyhow::{bail, Context, Result};
use jiff::tz::TimeZone;
use serde::Deserialize;
use serde_json::{json, Value};

use alarm_loader::alarm::{RetryPolicy, Target, DEFAULT_DISPATCH_TIMEOUT_MS};
use alarm_loader::cron::{Tick, TickKind};
use alarm_loader::jobs::{CronJob, Overlap, Strategy};
use journal::client::Client;
use journal::subjects::Subjects;

use crate::alarm::{body_of, body_text, call, now_ms, parse_header, print_json, target_text, utc};

/// `turnstile cron`.
#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Add a cron job (an existing name is replaced); prints its next ticks, local
    /// and UTC.
    Add(AddArgs),
    /// Delete a job: no tick of it fires any more (those already planned are skipped).
    Delete(NameArgs),
    /// Let a job's ticks fire again.
    Activate(NameArgs),
    /// Stop a job's ticks from firing; the job is kept.
    Deactivate(NameArgs),
    /// Show a job, the last tick planned (made into an alarm) and the next ticks.
    Get(NameArgs),
    /// Every job, by name: whether it is active, its target and schedule.
    List {
        /// Print the loader's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the next fire times of a schedule expression or of a stored job (its name,
    /// or --job NAME), local and UTC, one per line.
    Next(NextArgs),
}

impl Action {
    /// Whether the command asks the alarm-loader (everything but `next` of an
    /// expression).
    pub fn needs_server(&self) -> bool {
        match self {
            Action::Next(args) => args.stored_job().is_some(),
            _ => true,
        }
    }
}

/// A command naming one job.
#[derive(clap::Args, Debug)]
pub struct NameArgs {
    /// The job's name.
    name: String,
    /// Print the loader's answer as JSON.
    #[arg(long)]
    json: bool,
}

/// `turnstile cron add`.
#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The job's name: 1-100 characters of A-Z a-z 0-9 _ -, not ending in -.
    name: String,
    /// A cron expression (6 fields with seconds, or 5 without), an alias (@daily,
    /// @hourly, ...) or `@every 1h30m` (anchored at the job's creation); quote it.
    schedule: String,
    /// IANA time zone the fields are read in.
    #[arg(long, default_value = "UTC")]
    tz: String,
    /// Add it inactive: no tick fires until `cron activate`.
    #[arg(long)]
    inactive: bool,
    /// A tick while the previous tick's execution has not finished: allow it, or skip it.
    #[arg(long, value_parser = ["allow", "skip"], default_value = "allow")]
    overlap: String,
    /// Send each tick to every live instance of this worker group (on
    /// `<subject>.<instance id>`; needs --subject) instead of once.
    #[arg(long = "all", value_name = "GROUP")]
    all: Option<String>,
    /// Ticks that fell while no loader planned them: fire none, the latest, or all
    /// (up to --missed-bound, the newest).
    #[arg(long, value_parser = ["skip", "latest", "all"], default_value = "skip")]
    missed: String,
    /// Most missed ticks fired under --missed all.
    #[arg(long, default_value_t = 10)]
    missed_bound: u32,
    /// A tick counts as missed only once it is this late (ms); within it a tick that
    /// fell during a failover still fires, late.
    #[arg(long, default_value_t = alarm_loader::jobs::MISSED_AFTER_MS)]
    missed_grace_ms: u64,
    /// A wall time that does not exist (spring forward): fire once right after the
    /// gap, or skip it.
    #[arg(long, value_parser = ["shift", "skip"], default_value = "shift")]
    dst_gap: String,
    /// A wall time that occurs twice (fall back): fire at the first only, or at both.
    #[arg(long, value_parser = ["once", "twice"], default_value = "once")]
    dst_fold: String,
    /// Schedule each tick into this process's log.
    #[arg(long, required_unless_present = "subject", conflicts_with = "subject")]
    process: Option<String>,
    /// Send each tick as a NATS request to this subject.
    #[arg(long)]
    subject: Option<String>,
    /// The body of every tick (default: standard input).
    #[arg(long, short)]
    data: Option<String>,
    /// A header to send with every tick, NAME=VALUE (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_header, value_name = "NAME=VALUE")]
    headers: Vec<(String, String)>,
    /// How long a dispatch waits for its answer.
    #[arg(long, default_value_t = DEFAULT_DISPATCH_TIMEOUT_MS)]
    dispatch_timeout_ms: u64,
    /// Dispatch attempts of a tick in all (1: no retry).
    #[arg(long, default_value_t = RetryPolicy::default().attempts)]
    attempts: u32,
    /// Delay before the second attempt; doubled after each failure.
    #[arg(long, default_value_t = RetryPolicy::default().backoff_ms)]
    backoff_ms: u64,
    /// Longest delay between attempts.
    #[arg(long, default_value_t = RetryPolicy::default().max_backoff_ms)]
    max_backoff_ms: u64,
    /// Print the loader's answer as JSON.
    #[arg(long)]
    json: bool,
}

/// `turnstile cron next`: an expression or a stored job, one of them.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("schedule").required(true).args(["expression", "job"])))]
pub struct NextArgs {
    /// A cron expression (6 fields with seconds, or 5 without), an alias
    /// (@daily, @hourly, ...) or `@every 1h30m`; quote it. One word that is neither an
    /// alias nor `@every` names a stored job, as --job does.
    expression: Option<String>,
    /// A stored job instead of an expression: its schedule with its own zone, DST
    /// policy and `@every` anchor (asks the alarm-loader).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["tz", "every_anchor_ms", "gap", "fold"])]
    job: Option<String>,
    /// IANA time zone the fields are read in.
    #[arg(long, default_value = "UTC")]
    tz: String,
    /// How many fire times.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// The anchor of an `@every` schedule, ms since the epoch (the job's creation
    /// time; default: the epoch).
    #[arg(long)]
    every_anchor_ms: Option<i64>,
    /// Start after this instant, ms since the epoch (default: now).
    #[arg(long)]
    after_ms: Option<i64>,
    /// A wall time that does not exist: skip or shift (fire once after the gap).
    #[arg(long, default_value = "shift")]
    gap: String,
    /// A wall time that occurs twice: once or twice.
    #[arg(long, default_value = "once")]
    fold: String,
    /// One JSON object a line instead of text.
    #[arg(long)]
    json: bool,
}

impl NextArgs {
    /// The stored job asked about: `--job`, or a positional of one word not starting
    /// with `@` (no expression is one word but an alias, and a job name has no space).
    fn stored_job(&self) -> Option<&str> {
        self.job.as_deref().or(self
            .expression
            .as_deref()
            .filter(|e| !e.starts_with('@') && !e.trim().contains(char::is_whitespace)))
    }
}

/// A tick as the loader names it: its instant and the wall time the schedule named.
#[derive(Debug, Deserialize)]
struct AnsweredTick {
    utc_ms: i64,
    local: String,
}

/// The answer to `get` (schemas/alarms.md).
#[derive(Debug, Deserialize)]
struct Got {
    job: CronJob,
    last_planned_ms: Option<u64>,
    last_planned_alarm: Option<String>,
    next: Vec<AnsweredTick>,
}

/// The answer to `list`.
#[derive(Debug, Deserialize)]
struct Listed {
    jobs: Vec<ListedJob>,
}

#[derive(Debug, Deserialize)]
struct ListedJob {
    name: String,
    schedule: String,
    tz: String,
    active: bool,
    target: Target,
}

/// Runs one cron command; 0 done, 1 refused by the loader (printed on standard
/// error). `nats` is there when [`Action::needs_server`] says so.
pub async fn run(
    nats: Option<async_nats::Client>,
    subjects: Subjects,
    action: Action,
) -> Result<i32> {
    let mut out = std::io::stdout().lock();
    let client = nats.map(|n| Client::new(n, subjects.clone()));
    let client = || client.as_ref().context("no NATS connection");
    match action {
        Action::Add(args) => {
            let job = job_of(&args)?;
            let Some(answer) = call(client()?, subjects.cron_request("add"), &job).await? else {
                return Ok(1);
            };
            if args.json {
                return print_json(&mut out, &answer);
            }
            let next: Vec<AnsweredTick> = serde_json::from_value(answer["next"].clone())
                .context("the loader's answer to add is not what schemas/alarms.md says")?;
            let replaced = answer["replaced"].as_bool().unwrap_or(false);
            writeln!(
                out,
                "cron job {} {}; next:",
                job.name,
                if replaced { "replaced" } else { "added" }
            )?;
            write!(out, "{}", answered_ticks(&job.tz, &next)?)?;
            if !job.active {
                writeln!(
                    out,
                    "  (inactive: none fires until `turnstile cron activate {}`)",
                    job.name
                )?;
            }
        }
        Action::Delete(args) => {
            let Some(answer) = named(client()?, &subjects, "delete", &args.name).await? else {
                return Ok(1);
            };
            if args.json {
                return print_json(&mut out, &answer);
            }
            writeln!(out, "cron job {} deleted", args.name)?;
        }
        Action::Activate(args) => {
            return switch(client()?, &subjects, "activate", &args, &mut out).await;
        }
        Action::Deactivate(args) => {
            return switch(client()?, &subjects, "deactivate", &args, &mut out).await;
        }
        Action::Get(args) => {
            let Some(answer) = named(client()?, &subjects, "get", &args.name).await? else {
                return Ok(1);
            };
            if args.json {
                return print_json(&mut out, &answer);
            }
            let got: Got = serde_json::from_value(answer)
                .context("the loader's answer to get is not what schemas/alarms.md says")?;
            write!(out, "{}", show_job(&got)?)?;
        }
        Action::List { json } => {
            let Some(answer) = call(client()?, subjects.cron_request("list"), &json!({})).await?
            else {
                return Ok(1);
            };
            if json {
                return print_json(&mut out, &answer);
            }
            let listed: Listed = serde_json::from_value(answer)
                .context("the loader's answer to list is not what schemas/alarms.md says")?;
            for j in &listed.jobs {
                writeln!(out, "{}", list_line(j))?;
            }
        }
        Action::Next(args) => {
            let schedule = match args.stored_job() {
                Some(name) => {
                    if args.every_anchor_ms.is_some()
                        || args.tz != "UTC"
                        || args.gap != "shift"
                        || args.fold != "once"
                    {
                        bail!(
                            "{name} names a stored job, read in its own zone and policies: \
                             --tz, --every-anchor-ms, --gap and --fold are for expressions"
                        );
                    }
                    let Some(answer) = named(client()?, &subjects, "get", name).await? else {
                        return Ok(1);
                    };
                    let job: CronJob = serde_json::from_value(answer["job"].clone())
                        .context("the loader's answer to get has no job")?;
                    job.schedule()?
                }
                None => schedule_of(&args)?,
            };
            // The command line is the edge: the clock is read here, and only here.
            let after = match args.after_ms {
                Some(ms) => ms,
                None => i64::try_from(now_ms()?)?,
            };
            for tick in schedule.ticks_after(after).take(args.count) {
                writeln!(out, "{}", tick_line(schedule.zone(), &tick, args.json)?)?;
            }
        }
    }
    Ok(0)
}

/// Sends `{"name"}` to `<prefix>.cron.<op>`.
async fn named(
    client: &Client,
    subjects: &Subjects,
    op: &str,
    name: &str,
) -> Result<Option<Value>> {
    call(client, subjects.cron_request(op), &json!({ "name": name })).await
}

/// `activate` or `deactivate`: prints whether the job is now active.
async fn switch(
    client: &Client,
    subjects: &Subjects,
    op: &str,
    args: &NameArgs,
    out: &mut impl Write,
) -> Result<i32> {
    let Some(answer) = named(client, subjects, op, &args.name).await? else {
        return Ok(1);
    };
    if args.json {
        return print_json(out, &answer);
    }
    let active = answer["active"].as_bool().with_context(|| {
        format!("the loader's answer to {op} does not say whether it is active")
    })?;
    writeln!(
        out,
        "cron job {} {}",
        args.name,
        if active { "active" } else { "inactive" }
    )?;
    Ok(0)
}

/// The job `add` sends. What the loader alone can judge (the schedule, the zone, the
/// name, the target subject) is left to it: it refuses with `invalid_alarm`.
fn job_of(args: &AddArgs) -> Result<CronJob> {
    let target = match (&args.process, &args.subject) {
        (Some(p), _) => Target::Process(p.clone()),
        (None, Some(s)) => Target::Subject(s.clone()),
        (None, None) => bail!("give the target with --process or --subject"),
    };
    let overlap = match args.overlap.as_str() {
        "skip" => Overlap::Skip,
        _ => Overlap::Allow,
    };
    Ok(CronJob {
        name: args.name.clone(),
        schedule: args.schedule.clone(),
        tz: args.tz.clone(),
        active: !args.inactive,
        overlap,
        strategy: match &args.all {
            Some(group) => Strategy::All(group.clone()),
            None => Strategy::One,
        },
        missed: args.missed.clone(),
        missed_bound: args.missed_bound,
        missed_grace_ms: args.missed_grace_ms,
        dst_gap: args.dst_gap.clone(),
        dst_fold: args.dst_fold.clone(),
        target,
        body: body_of(args.data.as_deref())?,
        headers: args.headers.clone(),
        dispatch_timeout_ms: args.dispatch_timeout_ms,
        retry: RetryPolicy {
            attempts: args.attempts,
            backoff_ms: args.backoff_ms,
            max_backoff_ms: args.max_backoff_ms,
        },
        // Set by the loader when it stores the job.
        created_ms: 0,
    })
}

/// The schedule of `next <expression>`, from the command line's zone and policy.
fn schedule_of(args: &NextArgs) -> Result<alarm_loader::cron::Schedule> {
    let expression = args
        .expression
        .as_deref()
        .context("give an expression or --job")?;
    let dst = alarm_loader::cron::DstPolicy {
        gap: args.gap.parse()?,
        fold: args.fold.parse()?,
    };
    let mut schedule = alarm_loader::cron::Schedule::parse(expression)?
        .in_zone(alarm_loader::cron::zone(&args.tz)?)
        .with_dst(dst);
    if let Some(anchor) = args.every_anchor_ms {
        if schedule.every_ms().is_none() {
            bail!("--every-anchor-ms is for @every schedules only");
        }
        schedule = schedule.anchored_at(anchor);
    }
    Ok(schedule)
}

/// One fire time: the wall clock at the instant (with its offset), the instant in UTC,
/// and what the daylight-saving policy did, if anything.
pub(crate) fn tick_line(zone: &TimeZone, tick: &Tick, json: bool) -> Result<String> {
    let zoned = tick.utc().to_zoned(zone.clone());
    let local = zoned.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string();
    if json {
        return Ok(serde_json::to_string(&json!({
            "utc_ms": tick.utc_ms,
            "utc": tick.utc().to_string(),
            "local": local,
            "named": tick.local.to_string(),
            "kind": tick.kind.as_str(),
        }))?);
    }
    let note = match tick.kind {
        TickKind::Exact => String::new(),
        TickKind::Shifted => format!("  shifted: {} does not exist", tick.local),
        TickKind::Repeated => format!("  repeated: second {}", tick.local),
    };
    Ok(format!("{local}  {}{note}", tick.utc()))
}

/// The ticks the loader answered, one indented line each as `next` prints them. The
/// loader names each tick's wall time; where that differs from the wall clock at the
/// instant, the time did not exist and the tick was shifted past the gap.
fn answered_ticks(tz: &str, ticks: &[AnsweredTick]) -> Result<String> {
    let zone = alarm_loader::cron::zone(tz)?;
    let mut s = String::new();
    for t in ticks {
        let instant = jiff::Timestamp::from_millisecond(t.utc_ms)
            .with_context(|| format!("the loader answered a tick out of range: {}", t.utc_ms))?;
        let local: jiff::civil::DateTime = t
            .local
            .parse()
            .with_context(|| format!("the loader answered a tick's wall time {:?}", t.local))?;
        let zoned = instant.to_zoned(zone.clone());
        let kind = if zoned.datetime() == local {
            TickKind::Exact
        } else {
            TickKind::Shifted
        };
        let tick = Tick {
            utc_ms: t.utc_ms,
            local,
            offset: zoned.offset(),
            kind,
        };
        s += &format!("  {}\n", tick_line(&zone, &tick, false)?);
    }
    Ok(s)
}

fn strategy_text(s: &Strategy) -> String {
    match s {
        Strategy::One => "one execution per tick".into(),
        Strategy::All(group) => format!("every live instance of worker group {group}"),
    }
}

fn show_job(got: &Got) -> Result<String> {
    let j = &got.job;
    let state = if j.active { "active" } else { "inactive" };
    let mut s = format!("cron job {} ({state})\n", j.name);
    s += &format!("  schedule {} in {}\n", j.schedule, j.tz);
    s += &format!("  target   {}\n", target_text(&j.target));
    s += &format!("  runs     {}\n", strategy_text(&j.strategy));
    s += &format!("  body     {}\n", body_text(&j.body));
    for (k, v) in &j.headers {
        s += &format!("  header   {k}: {v}\n");
    }
    let overlap = match j.overlap {
        Overlap::Allow => "allow",
        Overlap::Skip => "skip",
    };
    s += &format!(
        "  policy   overlap {overlap}; missed {} (bound {}); DST gap {}, fold {}\n",
        j.missed, j.missed_bound, j.dst_gap, j.dst_fold
    );
    s += &format!(
        "  dispatch timeout {} ms; {} attempt(s), backoff {} ms doubling up to {} ms\n",
        j.dispatch_timeout_ms, j.retry.attempts, j.retry.backoff_ms, j.retry.max_backoff_ms
    );
    s += &format!("  created  {}\n", utc(j.created_ms));
    s += &match (got.last_planned_ms, &got.last_planned_alarm) {
        (Some(t), Some(id)) => format!("  planned  up to {}: alarm {id}\n", utc(t)),
        (Some(t), None) => format!("  planned  up to {}\n", utc(t)),
        (None, _) => "  planned  nothing yet\n".to_string(),
    };
    s += "next\n";
    s += &answered_ticks(&j.tz, &got.next)?;
    Ok(s)
}

/// One job of a list: its name, state and target, its schedule last (it has spaces).
fn list_line(j: &ListedJob) -> String {
    format!(
        "{}  {}  {}  {} in {}",
        j.name,
        if j.active { "active" } else { "inactive" },
        target_text(&j.target),
        j.schedule,
        j.tz
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(utc_ms: i64, local: &str) -> AnsweredTick {
        AnsweredTick {
            utc_ms,
            local: local.into(),
        }
    }

    #[test]
    fn answered_ticks_print_local_with_offset_and_utc_and_say_when_shifted() -> Result<()> {
        // New York, 2030-03-10: 02:30 does not exist; the loader shifts it to 03:00 EDT
        // (07:00Z) and names 02:30.
        let text = answered_ticks(
            "America/New_York",
            &[
                tick(1_899_352_800_000, "2030-03-10T01:00:00"),
                tick(1_899_356_400_000, "2030-03-10T02:30:00"),
            ],
        )?;
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "  2030-03-10T01:00:00-05:00  2030-03-10T06:00:00Z",
                "  2030-03-10T03:00:00-04:00  2030-03-10T07:00:00Z  shifted: 2030-03-10T02:30:00 does not exist",
            ]
        );
        Ok(())
    }

    #[test]
    fn a_job_reads_with_its_policies_and_its_last_planned_tick() -> Result<()> {
        let got: Got = serde_json::from_value(json!({
            "job": {"name": "beat", "schedule": "0 9 * * *", "tz": "Europe/Paris",
                    "target": {"subject": "jobs.beat"}, "body": "dGljaw==",
                    "strategy": {"all": "workers"}, "overlap": "skip",
                    "created_ms": 1_896_080_400_000_u64},
            "last_planned_ms": 1_896_163_200_000_u64,
            "last_planned_alarm": "cron-beat-1896163200000",
            "next": [{"utc_ms": 1_896_249_600_000_i64, "local": "2030-02-02T09:00:00"}],
        }))?;
        let text = show_job(&got)?;
        let expected = [
            "cron job beat (active)",
            "  schedule 0 9 * * * in Europe/Paris",
            "  target   to subject jobs.beat",
            "  runs     every live instance of worker group workers",
            "  body     4 bytes: \"tick\"",
            "  policy   overlap skip; missed skip (bound 10); DST gap shift, fold once",
            "  dispatch timeout 5000 ms; 5 attempt(s), backoff 1000 ms doubling up to 60000 ms",
            "  created  2030-01-31T09:00:00.000Z",
            "  planned  up to 2030-02-01T08:00:00.000Z: alarm cron-beat-1896163200000",
            "next",
            "  2030-02-02T09:00:00+01:00  2030-02-02T08:00:00Z",
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
        Ok(())
    }
}
