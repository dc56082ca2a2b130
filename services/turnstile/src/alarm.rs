//! `turnstile alarm set|cancel|get|list`: the alarm-loader's requests
//! (`<prefix>.alarm.<op>`, JSON bodies, schemas/alarms.md). The request bodies are
//! the loader's own wire types, so the CLI cannot drift from what the loader reads.

use std::io::{Read, Write};

use anyhow::{bail, Context, Result};
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use alarm_loader::alarm::{Alarm, Event, RetryPolicy, Status, Target, DEFAULT_DISPATCH_TIMEOUT_MS};
use journal::client::Client;
use journal::subjects::Subjects;

/// `turnstile alarm`.
#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Set an alarm (an existing id is replaced: a new firing); prints its due time.
    Set(SetArgs),
    /// Cancel an alarm that has not fired yet.
    Cancel {
        /// The alarm's id.
        id: String,
        /// Print the loader's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an alarm, its status and its history (one line per event).
    Get {
        /// The alarm's id.
        id: String,
        /// Print the loader's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The alarms that next need the loader within a time range (at most 24 h),
    /// earliest first.
    List {
        /// Start of the range: RFC 3339 or ms since the epoch (default: now).
        #[arg(long, value_parser = parse_time, value_name = "TIME")]
        from: Option<u64>,
        /// End of the range, inclusive (default: an hour after --from).
        #[arg(long, value_parser = parse_time, value_name = "TIME")]
        to: Option<u64>,
        /// Only alarms into this process.
        #[arg(long, conflicts_with = "subject")]
        process: Option<String>,
        /// Only alarms to this subject.
        #[arg(long)]
        subject: Option<String>,
        /// At most this many (the loader returns at most 1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Print the loader's answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `turnstile alarm set`.
#[derive(clap::Args, Debug)]
pub struct SetArgs {
    /// The alarm's id: 1-128 characters of A-Z a-z 0-9 - _.
    id: String,
    /// When it is due: RFC 3339 with an offset (2030-01-31T09:00:00Z) or ms since the
    /// epoch. In the past: it fires at once.
    #[arg(long, value_parser = parse_time, value_name = "TIME",
          required_unless_present = "in_", conflicts_with = "in_")]
    at: Option<u64>,
    /// When it is due, from now: 90s, 5m, 1h30m, 2d (units d h m s ms, largest first).
    #[arg(long = "in", value_parser = parse_duration, value_name = "DURATION")]
    in_: Option<u64>,
    /// Schedule it into this process's log.
    #[arg(long, required_unless_present = "subject", conflicts_with = "subject")]
    process: Option<String>,
    /// Send it as a NATS request to this subject (the responder answers ok, retry or an
    /// error: schemas/alarms.md).
    #[arg(long)]
    subject: Option<String>,
    /// The body (default: standard input).
    #[arg(long, short)]
    data: Option<String>,
    /// A header to send with it, NAME=VALUE (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_header, value_name = "NAME=VALUE")]
    headers: Vec<(String, String)>,
    /// How long a dispatch waits for its answer.
    #[arg(long, default_value_t = DEFAULT_DISPATCH_TIMEOUT_MS)]
    dispatch_timeout_ms: u64,
    /// Dispatch attempts in all (1: no retry).
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

/// The answer to `get` (schemas/alarms.md).
#[derive(Debug, Deserialize)]
struct Got {
    alarm: Alarm,
    status: Status,
    history: Vec<HistoryItem>,
}

#[derive(Debug, Deserialize)]
struct HistoryItem {
    seq: u64,
    event: Event,
}

/// The answer to `list`.
#[derive(Debug, Deserialize)]
struct Listed {
    alarms: Vec<ListedAlarm>,
    truncated: bool,
}

#[derive(Debug, Deserialize)]
struct ListedAlarm {
    id: String,
    next_ms: u64,
    due_ms: u64,
    target: Target,
    status: Status,
}

/// Runs one alarm command; 0 done, 1 refused by the loader (printed on standard error).
pub async fn run(nats: async_nats::Client, subjects: Subjects, action: Action) -> Result<i32> {
    // The command line is the edge: the clock is read here, and only here.
    let now = now_ms()?;
    let client = Client::new(nats, subjects.clone());
    let mut out = std::io::stdout().lock();
    match action {
        Action::Set(args) => {
            let alarm = alarm_of(&args, now)?;
            let Some(answer) = call(&client, subjects.alarm_request("set"), &alarm).await? else {
                return Ok(1);
            };
            if args.json {
                return print_json(&mut out, &answer);
            }
            let replaced = answer["replaced"].as_bool().unwrap_or(false);
            writeln!(
                out,
                "alarm {} {}: due {}, {}",
                alarm.id,
                if replaced { "replaced" } else { "set" },
                utc(alarm.due_ms),
                target_text(&alarm.target),
            )?;
        }
        Action::Cancel { id, json } => {
            let Some(answer) = call(
                &client,
                subjects.alarm_request("cancel"),
                &json!({ "id": id }),
            )
            .await?
            else {
                return Ok(1);
            };
            if json {
                return print_json(&mut out, &answer);
            }
            let status: Status = serde_json::from_value(answer["status"].clone())
                .context("the loader's answer to cancel has no status")?;
            if answer["cancelled"].as_bool() == Some(true) {
                writeln!(out, "alarm {id} cancelled")?;
            } else {
                // Not a refusal: the alarm exists and was already over.
                writeln!(
                    out,
                    "alarm {id} not cancelled: already {}",
                    status_text(&status)
                )?;
            }
        }
        Action::Get { id, json } => {
            let Some(answer) =
                call(&client, subjects.alarm_request("get"), &json!({ "id": id })).await?
            else {
                return Ok(1);
            };
            if json {
                return print_json(&mut out, &answer);
            }
            let got: Got = serde_json::from_value(answer)
                .context("the loader's answer to get is not what schemas/alarms.md says")?;
            write!(out, "{}", show_alarm(&got))?;
        }
        Action::List {
            from,
            to,
            process,
            subject,
            limit,
            json,
        } => {
            let from = from.unwrap_or(now);
            let to = to.unwrap_or(from.saturating_add(3_600_000));
            let target = match (process, subject) {
                (Some(p), _) => Some(Target::Process(p)),
                (None, Some(s)) => Some(Target::Subject(s)),
                (None, None) => None,
            };
            let mut request = json!({ "from_ms": from, "to_ms": to });
            if let Some(t) = &target {
                request["target"] = serde_json::to_value(t)?;
            }
            if let Some(l) = limit {
                request["limit"] = l.into();
            }
            let Some(answer) = call(&client, subjects.alarm_request("list"), &request).await?
            else {
                return Ok(1);
            };
            if json {
                return print_json(&mut out, &answer);
            }
            let listed: Listed = serde_json::from_value(answer)
                .context("the loader's answer to list is not what schemas/alarms.md says")?;
            for a in &listed.alarms {
                writeln!(out, "{}", list_line(a))?;
            }
            if listed.truncated {
                eprintln!("turnstile: the list may go on: narrow --from/--to or raise --limit");
            }
        }
    }
    Ok(0)
}

/// The alarm `set` sends: due at `--at` or now plus `--in`, the body from `-d` or
/// standard input.
fn alarm_of(args: &SetArgs, now: u64) -> Result<Alarm> {
    let due_ms = match (args.at, args.in_) {
        (Some(at), _) => at,
        (None, Some(d)) => now.saturating_add(d),
        (None, None) => bail!("give the due time with --at or --in"),
    };
    let body = body_of(args.data.as_deref())?;
    let target = match (&args.process, &args.subject) {
        (Some(p), _) => Target::Process(p.clone()),
        (None, Some(s)) => Target::Subject(s.clone()),
        (None, None) => bail!("give the target with --process or --subject"),
    };
    Ok(Alarm {
        id: args.id.clone(),
        due_ms,
        target,
        body,
        headers: args.headers.clone(),
        dispatch_timeout_ms: args.dispatch_timeout_ms,
        retry: RetryPolicy {
            attempts: args.attempts,
            backoff_ms: args.backoff_ms,
            max_backoff_ms: args.max_backoff_ms,
        },
        cron: None,
    })
}

/// The body given with `-d`, or else standard input.
pub(crate) fn body_of(data: Option<&str>) -> Result<Vec<u8>> {
    match data {
        Some(d) => Ok(d.as_bytes().to_vec()),
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            Ok(buf)
        }
    }
}

/// Sends one request to the alarm-loader (an alarm's or a cron job's); the JSON
/// answer, or none after printing the loader's typed refusal.
pub(crate) async fn call(
    client: &Client,
    subject: String,
    body: &impl serde::Serialize,
) -> Result<Option<Value>> {
    let body = Bytes::from(serde_json::to_vec(body)?);
    match client
        .request(subject.clone(), HeaderMap::new(), body)
        .await
    {
        Ok(msg) => Ok(Some(serde_json::from_slice(&msg.payload).with_context(
            || format!("the loader's answer on {subject} is not JSON"),
        )?)),
        Err(e @ journal::Error::Refused { .. }) => {
            eprintln!("turnstile: {e}");
            Ok(None)
        }
        Err(journal::Error::NoResponders(s)) => {
            bail!("no alarm-loader answers on {s} (is one running?)")
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn print_json(out: &mut impl Write, v: &Value) -> Result<i32> {
    writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
    Ok(0)
}

pub(crate) fn now_ms() -> Result<u64> {
    Ok(u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?)
}

/// A time on the command line: RFC 3339 with an offset, or ms since the epoch.
fn parse_time(text: &str) -> Result<u64, String> {
    let expected = "expected RFC 3339 with an offset (2030-01-31T09:00:00Z, \
                    2030-01-31T10:00:00+01:00) or milliseconds since the epoch";
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| format!("{text}: too large; {expected}"));
    }
    let ts: jiff::Timestamp = text.parse().map_err(|e| format!("{expected} ({e})"))?;
    u64::try_from(ts.as_millisecond()).map_err(|_| format!("{text}: before 1970; {expected}"))
}

/// A duration: `<n><unit>` groups, units `d h m s ms`, largest first, each at most
/// once (90s, 5m, 1h30m, 2d12h, 1500ms); in milliseconds.
fn parse_duration(text: &str) -> Result<u64, String> {
    let expected = "expected a duration like 90s, 5m, 1h30m (units d h m s ms, largest first)";
    if text.is_empty() {
        return Err(expected.into());
    }
    let mut rest = text;
    let mut total: u64 = 0;
    let mut last_rank = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let letters = rest[digits..]
            .bytes()
            .take_while(u8::is_ascii_alphabetic)
            .count();
        let (number, unit) = (&rest[..digits], &rest[digits..digits + letters]);
        if number.is_empty() || unit.is_empty() {
            return Err(format!("{text}: {expected}"));
        }
        let (rank, unit_ms) = match unit {
            "d" => (0, 86_400_000),
            "h" => (1, 3_600_000),
            "m" => (2, 60_000),
            "s" => (3, 1_000),
            "ms" => (4, 1),
            other => return Err(format!("{text}: unknown unit `{other}`; {expected}")),
        };
        if last_rank.is_some_and(|r| r >= rank) {
            return Err(format!(
                "{text}: units out of order or repeated; {expected}"
            ));
        }
        last_rank = Some(rank);
        let n: u64 = number.parse().map_err(|_| format!("{text}: too large"))?;
        total = n
            .checked_mul(unit_ms)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| format!("{text}: too large"))?;
        rest = &rest[digits + letters..];
    }
    Ok(total)
}

pub(crate) fn parse_header(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "headers are NAME=VALUE".to_string())
}

/// An instant as RFC 3339 UTC, as every command prints one.
pub(crate) fn utc(ms: u64) -> String {
    crate::audit::rfc3339(ms)
}

pub(crate) fn target_text(t: &Target) -> String {
    match t {
        Target::Process(p) => format!("into process {p}"),
        Target::Subject(s) => format!("to subject {s}"),
    }
}

fn status_text(s: &Status) -> String {
    match s {
        Status::Pending { next_ms, attempts } => {
            let failed = match attempts {
                0 => String::new(),
                n => format!(" ({n} failed so far)"),
            };
            format!("pending: next attempt at {}{failed}", utc(*next_ms))
        }
        Status::Dispatching {
            attempt,
            since_ms,
            by,
        } => format!(
            "dispatching: attempt {attempt} since {} by {by}",
            utc(*since_ms)
        ),
        Status::Done { at_ms, slot } => match slot {
            Some(slot) => format!("done at {}, slot {slot}", utc(*at_ms)),
            None => format!("done at {}", utc(*at_ms)),
        },
        Status::Dead { at_ms, reason } => format!("dead at {}: {reason}", utc(*at_ms)),
        Status::Cancelled { at_ms } => format!("cancelled at {}", utc(*at_ms)),
        Status::Skipped { at_ms, reason } => format!("skipped at {}: {reason}", utc(*at_ms)),
    }
}

/// When an event happened and what it says.
fn event_text(e: &Event) -> (u64, String) {
    match e {
        Event::Set { at_ms } => (*at_ms, "set".into()),
        Event::Skipped { at_ms, reason } => (*at_ms, format!("skipped: {reason}")),
        Event::Attempt { attempt, at_ms, by } => (*at_ms, format!("attempt {attempt} by {by}")),
        Event::Delivered {
            attempt,
            at_ms,
            lateness_ms,
            slot,
            duplicate,
        } => {
            let slot = slot.map(|s| format!(", slot {s}")).unwrap_or_default();
            let duplicate = if *duplicate {
                ", already in the log"
            } else {
                ""
            };
            (
                *at_ms,
                format!("delivered (attempt {attempt}, {lateness_ms} ms late{slot}{duplicate})"),
            )
        }
        Event::Failed {
            attempt,
            at_ms,
            reason,
        } => (*at_ms, format!("failed (attempt {attempt}): {reason}")),
        Event::RetryAsked {
            attempt,
            at_ms,
            in_ms,
        } => (
            *at_ms,
            format!("retry asked (attempt {attempt}): again in {in_ms} ms"),
        ),
        Event::DeadLettered { at_ms, reason } => (*at_ms, format!("dead-lettered: {reason}")),
        Event::Cancelled { at_ms } => (*at_ms, "cancelled".into()),
    }
}

/// A body for a person: text (quoted, cut at 80 characters) or its size.
pub(crate) fn body_text(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok("") => "empty".into(),
        Ok(s) if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => {
            let cut: String = s.chars().take(80).collect();
            let more = if cut.len() < s.len() { " …" } else { "" };
            format!("{} bytes: {cut:?}{more}", body.len())
        }
        _ => format!("{} bytes (binary; --json shows it as base64)", body.len()),
    }
}

fn show_alarm(got: &Got) -> String {
    let a = &got.alarm;
    let mut s = format!("alarm {}\n", a.id);
    s += &format!("  due      {}\n", utc(a.due_ms));
    s += &format!("  target   {}\n", target_text(&a.target));
    s += &format!("  body     {}\n", body_text(&a.body));
    for (k, v) in &a.headers {
        s += &format!("  header   {k}: {v}\n");
    }
    s += &format!(
        "  dispatch timeout {} ms; {} attempt(s), backoff {} ms doubling up to {} ms\n",
        a.dispatch_timeout_ms, a.retry.attempts, a.retry.backoff_ms, a.retry.max_backoff_ms
    );
    s += &format!("  status   {}\n", status_text(&got.status));
    s += "history\n";
    for h in &got.history {
        let (at, text) = event_text(&h.event);
        s += &format!("  {:>8}  {}  {text}\n", h.seq, utc(at));
    }
    s
}

/// One alarm of a list: when it next needs a loader (the line's time), and its state
/// in a word (the time is already the line's).
fn list_line(a: &ListedAlarm) -> String {
    let state = match &a.status {
        Status::Pending { attempts: 0, .. } => "pending".to_string(),
        Status::Pending { attempts, .. } => format!("pending, {attempts} failed attempt(s)"),
        Status::Dispatching { attempt, by, .. } => format!("dispatching attempt {attempt} by {by}"),
        other => status_text(other),
    };
    let due = if a.due_ms == a.next_ms {
        String::new()
    } else {
        format!(" (due {})", utc(a.due_ms))
    };
    format!(
        "{}  {}  {}  {state}{due}",
        utc(a.next_ms),
        a.id,
        target_text(&a.target),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_groups_largest_first() {
        let ok = [
            ("90s", 90_000),
            ("5m", 300_000),
            ("1h30m", 5_400_000),
            ("2d12h", 216_000_000),
            ("1s500ms", 1_500),
            ("0s", 0),
        ];
        for (text, ms) in ok {
            assert_eq!(parse_duration(text), Ok(ms), "{text}");
        }
        for bad in [
            "",
            "5",
            "m",
            "1x",
            "30m1h",
            "1m1m",
            "-5s",
            "1h 30m",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn times_are_rfc3339_with_an_offset_or_epoch_ms() {
        assert_eq!(parse_time("0"), Ok(0));
        assert_eq!(parse_time("1700000000123"), Ok(1_700_000_000_123));
        assert_eq!(parse_time("2030-01-31T09:00:00Z"), Ok(1_896_080_400_000));
        assert_eq!(
            parse_time("2030-01-31T10:00:00.5+01:00"),
            Ok(1_896_080_400_500)
        );
        for bad in [
            "",
            "tomorrow",
            "2030-01-31T09:00:00",
            "1969-12-31T23:59:59Z",
            "-5",
        ] {
            assert!(parse_time(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn printed_instants_read_back() {
        assert_eq!(utc(1_896_080_400_250), "2030-01-31T09:00:00.250Z");
        assert_eq!(parse_time(&utc(1_896_080_400_250)), Ok(1_896_080_400_250));
    }

    #[test]
    fn a_history_reads_one_event_a_line() -> Result<(), serde_json::Error> {
        let got: Got = serde_json::from_value(json!({
            "id": "a-1",
            "alarm": {"id": "a-1", "due_ms": 1_896_080_400_000_u64,
                      "target": {"process": "p"}, "body": "aGVsbG8="},
            "status": {"status": "done", "at_ms": 1_896_080_400_020_u64, "slot": 4},
            "history": [
                {"seq": 3, "event": {"event": "set", "at_ms": 1_896_079_400_000_u64},
                 "status": {"status": "pending", "next_ms": 1_896_080_400_000_u64, "attempts": 0}},
                {"seq": 7, "event": {"event": "attempt", "attempt": 1, "at_ms": 1_896_080_400_005_u64, "by": "L1"},
                 "status": {"status": "dispatching", "attempt": 1, "since_ms": 1_896_080_400_005_u64, "by": "L1"}},
                {"seq": 8, "event": {"event": "delivered", "attempt": 1, "at_ms": 1_896_080_400_020_u64,
                                     "lateness_ms": 5, "slot": 4, "duplicate": false},
                 "status": {"status": "done", "at_ms": 1_896_080_400_020_u64, "slot": 4}}
            ]
        }))?;
        let text = show_alarm(&got);
        let expected = [
            "alarm a-1",
            "  due      2030-01-31T09:00:00.000Z",
            "  target   into process p",
            "  body     5 bytes: \"hello\"",
            "  dispatch timeout 5000 ms; 5 attempt(s), backoff 1000 ms doubling up to 60000 ms",
            "  status   done at 2030-01-31T09:00:00.020Z, slot 4",
            "history",
            "         3  2030-01-31T08:43:20.000Z  set",
            "         7  2030-01-31T09:00:00.005Z  attempt 1 by L1",
            "         8  2030-01-31T09:00:00.020Z  delivered (attempt 1, 5 ms late, slot 4)",
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
        Ok(())
    }
}
