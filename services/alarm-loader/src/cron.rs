//! Cron schedules: when a job fires, in which zone, and what happens around
//! daylight-saving changes and after downtime. Pure: every function takes the instant
//! it reasons about; nothing here reads a clock.
//!
//! # Expressions
//! - Six fields, `second minute hour day-of-month month day-of-week`, or the classic
//!   five (no seconds field: the job fires at second 0). Per field: `*`, numbers,
//!   ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b`; month names `JAN`–`DEC`,
//!   weekday names `SUN`–`SAT`; day-of-week `0`–`7` with 0 and 7 both Sunday (POSIX,
//!   not Quartz's 1 = Sunday); `L`, `nW` in day-of-month; `n#k`, `n#L`, `nL` in
//!   day-of-week; `?` is `*`. Matching is croner's (see [`Schedule::parse`]).
//! - Day-of-month *and* day-of-week both restricted: either may match (Vixie cron's
//!   OR: `0 0 0 13 * FRI` fires on every 13th and every Friday). Prefix the
//!   day-of-week with `+` to require both (`0 0 0 13 * +FRI`: Friday the 13th).
//! - Aliases: `@yearly` = `@annually` (`0 0 0 1 1 *`), `@monthly` (`0 0 0 1 * *`),
//!   `@weekly` (`0 0 0 * * 0`, Sunday), `@daily` = `@midnight` (`0 0 0 * * *`),
//!   `@hourly` (`0 0 * * * *`).
//! - `@every <duration>`: `90s`, `15m`, `1h30m`, `1d`; units `d h m s`, each at most
//!   once, largest first; at least 1 s. Ticks are `anchor + k × period` for every
//!   integer k, in absolute time (zones and daylight saving do not move them). The
//!   anchor is given by the caller ([`Schedule::anchored_at`]; the service passes the
//!   job's creation time in ms, so the first tick after creation is one period later
//!   and every replica computes the same grid); without one it is the Unix epoch.
//!
//! # Zones and daylight saving
//! A cron schedule reads its fields on the wall clock of its IANA zone (UTC unless
//! told). Zones come from jiff's *bundled* tz database, never the host's, so replicas
//! of one build agree; two builds with different tzdb versions may not (a zone whose
//! rules changed between them).
//!
//! A wall time may not exist (clocks spring forward) or exist twice (clocks fall
//! back); [`DstPolicy`] decides: [`Gap::Shift`] fires once at the first instant after
//! the gap (several skipped wall times, e.g. an every-minute job, make one tick; a
//! tick that the schedule has anyway at that instant absorbs it), [`Gap::Skip`] does
//! not fire; [`Fold::Once`] fires at the first occurrence only, [`Fold::Twice`] at
//! both. The default, shift + once, runs a daily job exactly once every day. Note that
//! with `once` an hourly job has a two-hour pause at the fall-back (its 01:xx fires
//! once); a job that must run at a fixed real-time interval is an `@every` job.
//!
//! # Ticks
//! A [`Tick`] is the UTC instant (ms: a whole second for a cron expression, a point
//! of its grid for `@every`) and the wall time the schedule named.
//! [`Schedule::next_after`] is strictly after its input, so the ticks
//! of [`Schedule::ticks_after`] strictly increase; both depend on nothing but the
//! schedule and the instant. [`missed`] decides what to fire after downtime, and
//! [`tick_id`] names a tick for idempotent publishing.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use jiff::civil::DateTime;
use jiff::tz::{Offset, TimeZone, TimeZoneDatabase};
use jiff::{SignedDuration, Timestamp};

use crate::error::{Error, Result};

/// The shortest `@every` period, in ms.
pub const MIN_EVERY_MS: i64 = 1_000;

/// The longest job name, in bytes.
pub const MAX_JOB_NAME_LEN: usize = 128;

/// How many ticks [`missed`] counts one by one before it reports a lower bound.
pub const COUNT_LIMIT: u64 = 100_000;

/// A field of a cron expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Seconds, 0–59.
    Second,
    /// Minutes, 0–59.
    Minute,
    /// Hours, 0–23.
    Hour,
    /// Day of the month, 1–31.
    DayOfMonth,
    /// Month, 1–12 or JAN–DEC.
    Month,
    /// Day of the week, 0–7 (0 and 7 are Sunday) or SUN–SAT.
    DayOfWeek,
}

impl Field {
    /// The six fields in the order of a six-field expression.
    pub const ALL: [Field; 6] = [
        Field::Second,
        Field::Minute,
        Field::Hour,
        Field::DayOfMonth,
        Field::Month,
        Field::DayOfWeek,
    ];

    fn name(self) -> &'static str {
        match self {
            Field::Second => "second",
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
        }
    }

    /// The names (letters) a field may hold: croner replaces weekday and month names
    /// anywhere in the expression, so `MON` in the month field would silently become
    /// January; we refuse a name outside its own field instead.
    fn allows_name(self, name: &str) -> bool {
        const MONTHS: [&str; 12] = [
            "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
        ];
        const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
        match self {
            Field::Second | Field::Minute | Field::Hour => false,
            Field::DayOfMonth => matches!(name, "L" | "W" | "LW"),
            Field::Month => MONTHS.contains(&name),
            Field::DayOfWeek => name == "L" || DAYS.contains(&name),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to do with a wall time that does not exist (the clocks spring forward over it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gap {
    /// Do not fire.
    Skip,
    /// Fire once, at the first instant after the gap.
    #[default]
    Shift,
}

/// What to do with a wall time that occurs twice (the clocks fall back over it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fold {
    /// Fire at the first occurrence only.
    #[default]
    Once,
    /// Fire at both occurrences.
    Twice,
}

/// The daylight-saving policy of a job; the default is shift + once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DstPolicy {
    /// Wall times that do not exist.
    pub gap: Gap,
    /// Wall times that occur twice.
    pub fold: Fold,
}

impl FromStr for Gap {
    type Err = Error;
    fn from_str(s: &str) -> Result<Gap> {
        match s {
            "skip" => Ok(Gap::Skip),
            "shift" => Ok(Gap::Shift),
            _ => Err(Error::UnknownPolicy {
                what: "gap",
                value: s.into(),
                choices: "skip, shift",
            }),
        }
    }
}

impl FromStr for Fold {
    type Err = Error;
    fn from_str(s: &str) -> Result<Fold> {
        match s {
            "once" => Ok(Fold::Once),
            "twice" => Ok(Fold::Twice),
            _ => Err(Error::UnknownPolicy {
                what: "fold",
                value: s.into(),
                choices: "once, twice",
            }),
        }
    }
}

/// How a tick relates to the wall time it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickKind {
    /// The instant is the wall time's (its first occurrence, if it occurs twice).
    Exact,
    /// The wall time fell in a gap; the tick is the first instant after it ([`Gap::Shift`]).
    Shifted,
    /// The second occurrence of a wall time that occurs twice ([`Fold::Twice`]).
    Repeated,
}

impl TickKind {
    /// `exact`, `shifted` or `repeated`.
    pub fn as_str(self) -> &'static str {
        match self {
            TickKind::Exact => "exact",
            TickKind::Shifted => "shifted",
            TickKind::Repeated => "repeated",
        }
    }
}

/// One firing of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// The instant, ms since the Unix epoch (UTC): a whole second for a cron expression,
    /// `anchor + k × period` for `@every`.
    pub utc_ms: i64,
    /// The wall time the schedule named, in the schedule's zone. For an `@every`
    /// schedule: the zone's wall clock at the instant.
    pub local: DateTime,
    /// The zone's UTC offset in force at the instant. `utc + offset` is the wall clock
    /// at the instant, which is `local` except for a [`TickKind::Shifted`] tick.
    pub offset: Offset,
    /// Exact, shifted or repeated.
    pub kind: TickKind,
}

impl Tick {
    /// The instant as a jiff timestamp (prints as RFC 3339 UTC).
    pub fn utc(&self) -> Timestamp {
        // A tick is only ever built from a valid timestamp.
        Timestamp::from_millisecond(self.utc_ms).unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

/// The process-wide bundled tz database (embedded in the binary, not read from the host).
fn tzdb() -> &'static TimeZoneDatabase {
    static DB: OnceLock<TimeZoneDatabase> = OnceLock::new();
    DB.get_or_init(TimeZoneDatabase::bundled)
}

/// The IANA time zone `name` (e.g. `America/New_York`, `UTC`) from the bundled database.
pub fn zone(name: &str) -> Result<TimeZone> {
    tzdb()
        .get(name)
        .map_err(|_| Error::UnknownZone { name: name.into() })
}

#[derive(Debug, Clone)]
enum Rule {
    Cron(Box<Cron>),
    Every { period_ms: i64, anchor_ms: i64 },
}

/// A parsed schedule with its zone and daylight-saving policy.
#[derive(Debug, Clone)]
pub struct Schedule {
    expression: String,
    rule: Rule,
    zone: TimeZone,
    dst: DstPolicy,
}

impl Schedule {
    /// Parses a schedule (see the module docs for the forms), in UTC with the default
    /// daylight-saving policy and, for `@every`, the Unix epoch as anchor.
    ///
    /// Field syntax and matching are croner's (POSIX weekdays, seconds required after
    /// our five-field padding, no year field, no Quartz `0/10` steps); this wrapper
    /// adds the aliases, `@every`, names refused outside their field, errors that name
    /// the field, and a refusal of expressions that never fire.
    pub fn parse(expression: &str) -> Result<Schedule> {
        let text = expression.trim();
        if text.is_empty() {
            return Err(Error::EmptyExpression);
        }
        let rule = match text.strip_prefix('@') {
            Some(rest) => {
                let (alias, argument) = match rest.split_once(char::is_whitespace) {
                    Some((a, arg)) => (a, arg.trim()),
                    None => (rest, ""),
                };
                let alias_lower = alias.to_ascii_lowercase();
                if alias_lower == "every" {
                    Rule::Every {
                        period_ms: parse_every(argument)?,
                        anchor_ms: 0,
                    }
                } else {
                    let fields = match alias_lower.as_str() {
                        "yearly" | "annually" => "0 0 0 1 1 *",
                        "monthly" => "0 0 0 1 * *",
                        "weekly" => "0 0 0 * * 0",
                        "daily" | "midnight" => "0 0 0 * * *",
                        "hourly" => "0 0 * * * *",
                        _ => {
                            return Err(Error::UnknownAlias {
                                alias: alias.into(),
                            })
                        }
                    };
                    if !argument.is_empty() {
                        return Err(Error::AliasArgument {
                            alias: alias.into(),
                            argument: argument.into(),
                        });
                    }
                    Rule::Cron(Box::new(parse_fields(fields)?))
                }
            }
            None => Rule::Cron(Box::new(parse_fields(text)?)),
        };
        Ok(Schedule {
            expression: text.into(),
            rule,
            zone: TimeZone::UTC,
            dst: DstPolicy::default(),
        })
    }

    /// The same schedule read on the wall clock of `zone`.
    pub fn in_zone(mut self, zone: TimeZone) -> Schedule {
        self.zone = zone;
        self
    }

    /// The same schedule with another daylight-saving policy.
    pub fn with_dst(mut self, dst: DstPolicy) -> Schedule {
        self.dst = dst;
        self
    }

    /// For `@every`: the same period on the grid through `anchor_ms` (the job's
    /// creation time). Cron expressions have no anchor and are returned unchanged.
    pub fn anchored_at(mut self, anchor_ms: i64) -> Schedule {
        if let Rule::Every {
            anchor_ms: anchor, ..
        } = &mut self.rule
        {
            *anchor = anchor_ms;
        }
        self
    }

    /// The expression as written (trimmed).
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The zone the fields are read in.
    pub fn zone(&self) -> &TimeZone {
        &self.zone
    }

    /// The daylight-saving policy.
    pub fn dst(&self) -> DstPolicy {
        self.dst
    }

    /// The period of an `@every` schedule, in ms (`None` for a cron expression).
    pub fn every_ms(&self) -> Option<i64> {
        match self.rule {
            Rule::Every { period_ms, .. } => Some(period_ms),
            Rule::Cron(_) => None,
        }
    }

    /// The first tick strictly after `after_utc_ms`; `None` past the last representable
    /// tick (croner searches up to the year 5000, jiff to 9999).
    pub fn next_after(&self, after_utc_ms: i64) -> Option<Tick> {
        match &self.rule {
            Rule::Every {
                period_ms,
                anchor_ms,
            } => self.next_every(*period_ms, *anchor_ms, after_utc_ms),
            Rule::Cron(cron) => self.next_cron(cron, after_utc_ms),
        }
    }

    /// The ticks strictly after `after_utc_ms`, in order (`.take(n)` for the next n).
    pub fn ticks_after(&self, after_utc_ms: i64) -> Ticks<'_> {
        Ticks {
            schedule: self,
            after_ms: after_utc_ms,
        }
    }

    fn next_every(&self, period_ms: i64, anchor_ms: i64, after_ms: i64) -> Option<Tick> {
        let since = after_ms.checked_sub(anchor_ms)?;
        let k = since.div_euclid(period_ms).checked_add(1)?;
        let utc_ms = anchor_ms.checked_add(k.checked_mul(period_ms)?)?;
        let at = Timestamp::from_millisecond(utc_ms).ok()?;
        let offset = self.zone.to_offset(at);
        Some(Tick {
            utc_ms,
            local: offset.to_datetime(at),
            offset,
            kind: TickKind::Exact,
        })
    }

    /// Walks the zone's offset periods (spans of constant UTC offset) from `after`:
    /// within a period, wall time and instant differ by the offset, so the first
    /// matching wall time of the period gives the tick; the gap or fold at a period's
    /// edges is where the policy applies.
    fn next_cron(&self, cron: &Cron, after_ms: i64) -> Option<Tick> {
        let tz = &self.zone;
        let ns = SignedDuration::from_nanos(1);
        // Ticks are whole seconds: the first candidate instant is the next one.
        let mut from = Timestamp::from_second(after_ms.div_euclid(1000).checked_add(1)?).ok()?;
        loop {
            let offset = tz.to_offset(from);
            // The transition that began this period (at or before `from`) and the
            // offset before it.
            let start = tz
                .preceding(from.checked_add(ns).ok()?)
                .next()
                .map(|t| t.timestamp());
            let before = match start {
                Some(s) => tz.to_offset(s.checked_sub(ns).ok()?),
                None => offset,
            };
            let end = tz
                .following(from)
                .next()
                .map(|t| (t.timestamp(), t.offset()));

            // Wall times before `repeat_end` also existed before this period began.
            let repeat_end = match start {
                Some(s) if before > offset => Some(before.to_datetime(s)),
                _ => None,
            };
            let mut lowest = offset.to_datetime(from);
            if let (Fold::Once, Some(r)) = (self.dst.fold, repeat_end) {
                lowest = lowest.max(r);
            }
            let wall = cron.find_next_occurrence(&lowest, true).ok()?;
            let wall_end = end.map(|(e, _)| offset.to_datetime(e));
            if wall_end.is_none_or(|we| wall < we) {
                let at = offset.to_timestamp(wall).ok()?;
                let kind = match repeat_end {
                    Some(r) if wall < r => TickKind::Repeated,
                    _ => TickKind::Exact,
                };
                return tick(at, wall, offset, kind);
            }
            // No wall time of this period matches; `wall` is the first one after it.
            let (end_at, next_offset) = end?;
            if self.dst.gap == Gap::Shift
                && next_offset > offset
                && wall < next_offset.to_datetime(end_at)
            {
                // `wall` falls in the gap: fire at the gap's end, unless the schedule
                // has a tick of its own at that instant (then that one stands).
                let at_end = next_offset.to_datetime(end_at);
                let kind_wall = if cron.is_time_matching(&at_end).unwrap_or(false) {
                    (TickKind::Exact, at_end)
                } else {
                    (TickKind::Shifted, wall)
                };
                return tick(end_at, kind_wall.1, next_offset, kind_wall.0);
            }
            from = end_at;
        }
    }
}

fn tick(at: Timestamp, local: DateTime, offset: Offset, kind: TickKind) -> Option<Tick> {
    Some(Tick {
        utc_ms: at.as_millisecond(),
        local,
        offset,
        kind,
    })
}

/// The ticks of a schedule after an instant, in increasing order.
#[derive(Debug, Clone)]
pub struct Ticks<'a> {
    schedule: &'a Schedule,
    after_ms: i64,
}

impl Iterator for Ticks<'_> {
    type Item = Tick;
    fn next(&mut self) -> Option<Tick> {
        let t = self.schedule.next_after(self.after_ms)?;
        self.after_ms = t.utc_ms;
        Some(t)
    }
}

fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Disallowed)
        .build()
}

/// Parses 5 or 6 cron fields with croner, each field alone first so that an error
/// names its field.
fn parse_fields(text: &str) -> Result<Cron> {
    let written: Vec<&str> = text.split_whitespace().collect();
    let (fields, padded) = match written.len() {
        6 => (written.clone(), 0),
        5 => {
            let mut f = vec!["0"];
            f.extend(&written);
            (f, 1)
        }
        found => return Err(Error::FieldCount { found }),
    };
    for (i, (field, text)) in Field::ALL.iter().zip(&fields).enumerate() {
        let problem = |reason: String| Error::Field {
            field: *field,
            position: i + 1 - padded,
            text: (*text).into(),
            reason,
        };
        let upper = text.to_ascii_uppercase();
        for name in upper
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|n| !n.is_empty())
        {
            // `15W`, `5L`: the letter after a number is one name here.
            if !field.allows_name(name) {
                return Err(problem(format!("`{name}` is not allowed in this field")));
            }
        }
        let mut probe = ["*"; 6];
        probe[i] = text;
        parser()
            .parse(&probe.join(" "))
            .map_err(|e| problem(e.to_string()))?;
    }
    let expression = fields.join(" ");
    let cron = parser().parse(&expression).map_err(|e| Error::Expression {
        expression: text.into(),
        reason: e.to_string(),
    })?;
    // Refuse what can never fire (30 February) now rather than at every lookup.
    let epoch = DateTime::constant(1970, 1, 1, 0, 0, 0, 0);
    if cron.find_next_occurrence(&epoch, true).is_err() {
        return Err(Error::NeverFires {
            expression: text.into(),
        });
    }
    Ok(cron)
}

/// Parses the duration of `@every`: `<n><unit>` groups, units `d h m s`, largest first,
/// each at most once; at least one second.
fn parse_every(text: &str) -> Result<i64> {
    let problem = |reason: String| Error::Every {
        text: text.into(),
        reason,
    };
    if text.is_empty() {
        return Err(problem("missing duration".into()));
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut total: i64 = 0;
    let mut last_rank: Option<usize> = None;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(problem(format!("expected a number at byte {start}")));
        }
        let n: i64 = text[start..i]
            .parse()
            .map_err(|_| problem(format!("number at byte {start} is too large")))?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let (rank, unit_ms) = match &text[unit_start..i] {
            "d" => (0, 86_400_000),
            "h" => (1, 3_600_000),
            "m" => (2, 60_000),
            "s" => (3, 1_000),
            "" => {
                return Err(problem(format!(
                    "missing unit at byte {unit_start} (d, h, m or s)"
                )))
            }
            other => {
                return Err(problem(format!(
                    "unknown unit `{other}` at byte {unit_start} (d, h, m or s)"
                )))
            }
        };
        if last_rank.is_some_and(|r| r >= rank) {
            return Err(problem(format!(
                "unit at byte {unit_start} out of order: largest first, each once"
            )));
        }
        last_rank = Some(rank);
        total = n
            .checked_mul(unit_ms)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| problem("too long".into()))?;
    }
    if total < MIN_EVERY_MS {
        return Err(Error::EveryTooShort { text: text.into() });
    }
    Ok(total)
}

/// What to do with the ticks that fell due while nobody fired them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissedPolicy {
    /// Fire none of them; go on with the next tick.
    #[default]
    Skip,
    /// Fire the most recent one only.
    Latest,
    /// Fire every one, up to a bound (the newest ones if there are more).
    All,
}

impl FromStr for MissedPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<MissedPolicy> {
        match s {
            "skip" => Ok(MissedPolicy::Skip),
            "latest" => Ok(MissedPolicy::Latest),
            "all" => Ok(MissedPolicy::All),
            _ => Err(Error::UnknownPolicy {
                what: "missed",
                value: s.into(),
                choices: "skip, latest, all",
            }),
        }
    }
}

/// A count of ticks that may have been cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Exactly this many.
    Exact(u64),
    /// At least this many: counting stopped at [`COUNT_LIMIT`] ticks.
    AtLeast(u64),
}

/// The decision of [`missed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    /// The ticks to fire now, oldest first.
    pub fire: Vec<Tick>,
    /// How many due ticks are not fired.
    pub dropped: Count,
}

/// The ticks due and not done: those in `(last_done_utc_ms, now_ms]`, and which of
/// them to fire under `policy` (`bound`: the most that [`MissedPolicy::All`] fires).
pub fn missed(
    schedule: &Schedule,
    last_done_utc_ms: i64,
    now_ms: i64,
    policy: MissedPolicy,
    bound: usize,
) -> Missed {
    let keep = match policy {
        MissedPolicy::Skip => 0,
        MissedPolicy::Latest => 1,
        MissedPolicy::All => bound,
    };
    if now_ms <= last_done_utc_ms {
        return Missed {
            fire: Vec::new(),
            dropped: Count::Exact(0),
        };
    }
    let (fire, total) = newest(schedule, last_done_utc_ms, now_ms, keep);
    let fired = fire.len() as u64;
    let dropped = match total {
        Count::Exact(n) => Count::Exact(n.saturating_sub(fired)),
        Count::AtLeast(n) => Count::AtLeast(n.saturating_sub(fired)),
    };
    Missed { fire, dropped }
}

/// The newest `keep` ticks in `(from, to]` and how many ticks it holds.
fn newest(schedule: &Schedule, from: i64, to: i64, keep: usize) -> (Vec<Tick>, Count) {
    if let Some(period) = schedule.every_ms() {
        // The grid is arithmetic: count it, and walk back from its last point.
        let first = schedule.next_after(from);
        let mut out = Vec::new();
        let mut at = first.map(|t| t.utc_ms);
        let total = match at {
            Some(f) if f <= to => ((to - f) / period + 1) as u64,
            _ => 0,
        };
        if total > 0 {
            let skip = total.saturating_sub(keep as u64);
            at = at.map(|f| f + (skip as i64) * period);
            while let Some(a) = at.filter(|a| *a <= to) {
                match schedule.next_after(a - 1) {
                    Some(t) => out.push(t),
                    None => break,
                }
                at = a.checked_add(period);
            }
        }
        return (out, Count::Exact(total));
    }
    let mut ring: VecDeque<Tick> = VecDeque::with_capacity(keep.min(1024));
    let mut count: u64 = 0;
    for t in schedule.ticks_after(from) {
        if t.utc_ms > to {
            return (ring.into(), Count::Exact(count));
        }
        count += 1;
        if keep > 0 {
            if ring.len() == keep {
                ring.pop_front();
            }
            ring.push_back(t);
        }
        if count >= COUNT_LIMIT {
            break;
        }
    }
    if count < COUNT_LIMIT {
        // The schedule ended before `to`.
        return (ring.into(), Count::Exact(count));
    }
    // Too many to count: find the newest `keep` in a window ending at `to` that
    // doubles until it holds them (or reaches `from`).
    let mut width: i64 = 60_000;
    loop {
        let low = to.saturating_sub(width).max(from);
        let mut window: VecDeque<Tick> = VecDeque::with_capacity(keep.min(1024));
        for t in schedule.ticks_after(low) {
            if t.utc_ms > to {
                break;
            }
            if keep > 0 {
                if window.len() == keep {
                    window.pop_front();
                }
                window.push_back(t);
            }
        }
        if window.len() >= keep || low == from {
            return (window.into(), Count::AtLeast(count));
        }
        width = width.saturating_mul(2);
    }
}

/// A validated job name: 1 to [`MAX_JOB_NAME_LEN`] bytes of `A-Z a-z 0-9 _ -`, not
/// ending with `-`. So a name, and a [`tick_id`] made from it, is always one NATS
/// subject token, a JetStream message id and a KV key; the last rule keeps tick ids
/// unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobName(String);

impl JobName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<JobName> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("empty")
        } else if name.len() > MAX_JOB_NAME_LEN {
            Some("longer than 128 bytes")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            Some("only A-Z a-z 0-9 _ - are allowed")
        } else if name.ends_with('-') {
            Some("must not end with -")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidJobName { name, reason }),
            None => Ok(JobName(name)),
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for JobName {
    type Err = Error;
    fn from_str(s: &str) -> Result<JobName> {
        JobName::new(s)
    }
}

/// The idempotency id of a job's tick: `<job>-<tick_utc_ms>` in decimal, e.g.
/// `backup-1772953200000` (a tick before 1970 reads `<job>--<ms>`). Stable: it depends
/// on the name and the instant only, so every replica firing the same tick publishes
/// the same id. At most 128 + 21 bytes of `A-Z a-z 0-9 _ -`: a NATS subject token, a
/// message id, a KV key, and a valid process id. [`parse_tick_id`] reads it back.
pub fn tick_id(job: &JobName, tick_utc_ms: i64) -> String {
    format!("{job}-{tick_utc_ms}")
}

/// The job and instant of a [`tick_id`].
pub fn parse_tick_id(id: &str) -> Result<(JobName, i64)> {
    let bad = || Error::InvalidTickId(id.into());
    let digits = id.len() - id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (head, number) = id.split_at(id.len() - digits);
    let head = head.strip_suffix('-').ok_or_else(bad)?;
    // A name never ends with `-`, so a second `-` is the instant's sign.
    let (name, text) = match head.strip_suffix('-') {
        Some(name) => (name, format!("-{number}")),
        None => (head, number.to_string()),
    };
    let ms: i64 = text.parse().map_err(|_| bad())?;
    let job = JobName::new(name).map_err(|_| bad())?;
    if tick_id(&job, ms) != id {
        // Leading zeros and the like: not an id this module wrote.
        return Err(bad());
    }
    Ok((job, ms))
}

#[cfg(test)]
mod tests;
