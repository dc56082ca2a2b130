//! Tests of the cron logic: parsing (table-driven), real daylight-saving transitions,
//! a second-by-second oracle for the DST wrap, missed runs, tick ids, and properties.

use jiff::civil::{date, Date};
use jiff::tz::AmbiguousOffset;
use proptest::prelude::*;

use super::*;

// ----- helpers -------------------------------------------------------------------

fn ms(rfc3339: &str) -> i64 {
    rfc3339.parse::<Timestamp>().unwrap().as_millisecond()
}

fn utc(ms: i64) -> String {
    Timestamp::from_millisecond(ms).unwrap().to_string()
}

fn sched(expr: &str, tz: &str, gap: Gap, fold: Fold) -> Schedule {
    Schedule::parse(expr)
        .unwrap()
        .in_zone(zone(tz).unwrap())
        .with_dst(DstPolicy { gap, fold })
}

/// The ticks whose instant falls on the local calendar day `day` of the schedule's
/// zone (from that day's first instant to the next day's).
fn ticks_on(s: &Schedule, day: Date) -> Vec<Tick> {
    let tz = s.zone().clone();
    let start = day
        .to_zoned(tz.clone())
        .unwrap()
        .timestamp()
        .as_millisecond();
    let end = day
        .tomorrow()
        .unwrap()
        .to_zoned(tz)
        .unwrap()
        .timestamp()
        .as_millisecond();
    s.ticks_after(start - 1)
        .take_while(|t| t.utc_ms < end)
        .collect()
}

fn utcs(ticks: &[Tick]) -> Vec<String> {
    ticks.iter().map(|t| utc(t.utc_ms)).collect()
}

const POLICIES: [DstPolicy; 4] = [
    DstPolicy {
        gap: Gap::Shift,
        fold: Fold::Once,
    },
    DstPolicy {
        gap: Gap::Shift,
        fold: Fold::Twice,
    },
    DstPolicy {
        gap: Gap::Skip,
        fold: Fold::Once,
    },
    DstPolicy {
        gap: Gap::Skip,
        fold: Fold::Twice,
    },
];

// ----- parsing -------------------------------------------------------------------

#[test]
fn five_fields_fire_at_second_zero_and_six_fields_read_seconds() {
    let after = ms("2026-01-01T00:00:00Z");
    let five = Schedule::parse("*/15 * * * *").unwrap();
    assert_eq!(
        utcs(&five.ticks_after(after).take(2).collect::<Vec<_>>()),
        ["2026-01-01T00:15:00Z", "2026-01-01T00:30:00Z"]
    );
    let six = Schedule::parse("30 */15 * * * *").unwrap();
    assert_eq!(
        utcs(&six.ticks_after(after).take(2).collect::<Vec<_>>()),
        ["2026-01-01T00:00:30Z", "2026-01-01T00:15:30Z"]
    );
}

#[test]
fn aliases_are_their_six_fields() {
    let after = ms("2026-02-03T04:05:06Z");
    for (alias, fields) in [
        ("@yearly", "0 0 0 1 1 *"),
        ("@annually", "0 0 0 1 1 *"),
        ("@monthly", "0 0 0 1 * *"),
        ("@weekly", "0 0 0 * * 0"),
        ("@daily", "0 0 0 * * *"),
        ("@midnight", "0 0 0 * * *"),
        ("@hourly", "0 0 * * * *"),
        ("@HOURLY", "0 0 * * * *"),
    ] {
        let a: Vec<Tick> = Schedule::parse(alias)
            .unwrap()
            .ticks_after(after)
            .take(5)
            .collect();
        let f: Vec<Tick> = Schedule::parse(fields)
            .unwrap()
            .ticks_after(after)
            .take(5)
            .collect();
        assert_eq!(a.len(), 5, "{alias}");
        assert_eq!(a, f, "{alias}");
    }
    // @weekly is Sunday midnight.
    let w = Schedule::parse("@weekly")
        .unwrap()
        .next_after(after)
        .unwrap();
    assert_eq!(utc(w.utc_ms), "2026-02-08T00:00:00Z");
    assert_eq!(w.local.weekday(), jiff::civil::Weekday::Sunday);
}

#[test]
fn weekdays_are_posix_and_names_work() {
    // 2026-03-02 is a Monday.
    let after = ms("2026-03-01T12:00:00Z");
    for expr in ["0 0 0 * * 1", "0 0 0 * * MON", "0 0 0 * * mon", "0 0 * * 1"] {
        let t = Schedule::parse(expr).unwrap().next_after(after).unwrap();
        assert_eq!(utc(t.utc_ms), "2026-03-02T00:00:00Z", "{expr}");
    }
    for expr in ["0 0 0 * * 0", "0 0 0 * * 7", "0 0 0 * * SUN"] {
        let t = Schedule::parse(expr).unwrap().next_after(after).unwrap();
        assert_eq!(utc(t.utc_ms), "2026-03-08T00:00:00Z", "{expr}");
    }
    let t = Schedule::parse("0 0 0 1 JUN *")
        .unwrap()
        .next_after(after)
        .unwrap();
    assert_eq!(utc(t.utc_ms), "2026-06-01T00:00:00Z");
}

#[test]
fn day_of_month_and_day_of_week_are_or_unless_plus() {
    let after = ms("2026-01-01T00:00:00Z");
    // 2026-01-02 is a Friday; 2026-02-13 is Friday the 13th.
    let or: Vec<String> = utcs(
        &Schedule::parse("0 0 0 13 * FRI")
            .unwrap()
            .ticks_after(after)
            .take(3)
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        or,
        [
            "2026-01-02T00:00:00Z",
            "2026-01-09T00:00:00Z",
            "2026-01-13T00:00:00Z"
        ]
    );
    let and = Schedule::parse("0 0 0 13 * +FRI")
        .unwrap()
        .next_after(after)
        .unwrap();
    assert_eq!(utc(and.utc_ms), "2026-02-13T00:00:00Z");
    // One of them `*`: only the other counts.
    let dow_only = Schedule::parse("0 0 0 * * FRI")
        .unwrap()
        .next_after(after)
        .unwrap();
    assert_eq!(utc(dow_only.utc_ms), "2026-01-02T00:00:00Z");
}

/// What kind of error an expression gives; tests compare kinds, not messages.
fn error_kind(expr: &str) -> String {
    match Schedule::parse(expr) {
        Ok(_) => "ok".into(),
        Err(Error::Field {
            field, position, ..
        }) => format!("field {field} @{position}"),
        Err(Error::FieldCount { found }) => format!("count {found}"),
        Err(e) => format!("{e:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

#[test]
fn errors_say_what_is_wrong_and_where() {
    for (expr, want) in [
        ("", "EmptyExpression"),
        ("   ", "EmptyExpression"),
        ("* * * *", "count 4"),
        ("0 * * * * * 2026", "count 7"),
        ("60 * * * * *", "field second @1"),
        ("0 60 * * * *", "field minute @2"),
        ("0 0 24 * * *", "field hour @3"),
        ("0 24 * * *", "field hour @2"),
        ("0 0 0 32 * *", "field day-of-month @4"),
        ("0 0 0 0 * *", "field day-of-month @4"),
        ("0 0 0 * 13 *", "field month @5"),
        ("0 0 0 * MON *", "field month @5"),
        ("0 0 0 * * 8", "field day-of-week @6"),
        ("0 0 0 * * JAN", "field day-of-week @6"),
        ("0 0 0 MON * *", "field day-of-month @4"),
        ("0 0/10 * * * *", "field minute @2"),
        ("x * * * * *", "field second @1"),
        ("0 @hourly * * * *", "field minute @2"),
        ("0 0 0 30 2 *", "NeverFires"),
        ("0 0 0 31 4,6,9,11 *", "NeverFires"),
        ("@fortnightly", "UnknownAlias"),
        ("@daily 5", "AliasArgument"),
        ("@every", "Every"),
        ("@every 90", "Every"),
        ("@every 1x", "Every"),
        ("@every 1m1h", "Every"),
        ("@every 1h1h", "Every"),
        ("@every 1.5h", "Every"),
        ("@every 500ms", "Every"),
        ("@every 99999999999999999999s", "Every"),
        ("@every 0s", "EveryTooShort"),
        // Valid ones, for contrast.
        ("0 0 0 29 2 *", "ok"),
        ("0 0 0 L * *", "ok"),
        ("0 0 0 15W * *", "ok"),
        ("0 0 0 * * 5#2", "ok"),
        ("0 0 0 * * 5L", "ok"),
        ("0 0 0 ? * MON-FRI", "ok"),
        ("0 0 9-17/2 * JAN-MAR,DEC *", "ok"),
        ("@every 1s", "ok"),
        ("@every 1d2h3m4s", "ok"),
    ] {
        assert_eq!(error_kind(expr), want, "{expr:?}");
    }
}

#[test]
fn field_errors_carry_the_text_and_the_reason() {
    let Err(Error::Field {
        field,
        position,
        text,
        reason,
    }) = Schedule::parse("0 0 25 * * *")
    else {
        panic!("expected a field error");
    };
    assert_eq!((field, position, text.as_str()), (Field::Hour, 3, "25"));
    assert!(!reason.is_empty());
}

#[test]
fn every_reads_durations() {
    for (text, want) in [
        ("1s", 1_000),
        ("90s", 90_000),
        ("15m", 900_000),
        ("1h30m", 5_400_000),
        ("1d", 86_400_000),
        ("1d2h3m4s", 93_784_000),
    ] {
        let s = Schedule::parse(&format!("@every {text}")).unwrap();
        assert_eq!(s.every_ms(), Some(want), "{text}");
    }
    assert_eq!(Schedule::parse("@daily").unwrap().every_ms(), None);
}

#[test]
fn every_is_anchored_and_zones_do_not_move_it() {
    let anchor = ms("2026-03-08T06:59:30.250Z");
    let s = Schedule::parse("@every 1h30m")
        .unwrap()
        .anchored_at(anchor)
        .in_zone(zone("America/New_York").unwrap());
    // The first tick after creation is one period later; then every 90 minutes in
    // real time, across the spring-forward transition at 07:00Z.
    let ticks: Vec<i64> = s.ticks_after(anchor).take(4).map(|t| t.utc_ms).collect();
    let p = 5_400_000;
    assert_eq!(
        ticks,
        [anchor + p, anchor + 2 * p, anchor + 3 * p, anchor + 4 * p]
    );
    // The grid extends before the anchor too, so a lookup from any instant agrees.
    assert_eq!(s.next_after(anchor - 1).unwrap().utc_ms, anchor);
    assert_eq!(s.next_after(anchor - p).unwrap().utc_ms, anchor);
    // Another zone: same instants, other wall times.
    let in_utc = s.clone().in_zone(TimeZone::UTC);
    let t = in_utc.next_after(anchor).unwrap();
    assert_eq!(t.utc_ms, ticks[0]);
    assert_eq!(t.local.to_string(), "2026-03-08T08:29:30.25");
    assert_eq!(
        s.next_after(anchor).unwrap().local.to_string(),
        "2026-03-08T04:29:30.25"
    );
    // Without an anchor: the Unix epoch.
    let plain = Schedule::parse("@every 90s").unwrap();
    assert_eq!(plain.next_after(0).unwrap().utc_ms, 90_000);
    assert_eq!(plain.next_after(-1).unwrap().utc_ms, 0);
    // anchored_at leaves a cron expression alone.
    let cron = Schedule::parse("@hourly").unwrap();
    assert_eq!(
        cron.clone().anchored_at(123).next_after(0),
        cron.next_after(0)
    );
}

#[test]
fn zones_come_from_the_bundled_database() {
    for name in [
        "UTC",
        "America/New_York",
        "Europe/Berlin",
        "Australia/Lord_Howe",
        "Asia/Kolkata",
    ] {
        assert!(zone(name).is_ok(), "{name}");
    }
    assert!(matches!(
        zone("Mars/Olympus_Mons"),
        Err(Error::UnknownZone { .. })
    ));
}

#[test]
fn policies_parse_from_their_names() {
    assert_eq!("skip".parse::<Gap>().unwrap(), Gap::Skip);
    assert_eq!("shift".parse::<Gap>().unwrap(), Gap::Shift);
    assert_eq!("once".parse::<Fold>().unwrap(), Fold::Once);
    assert_eq!("twice".parse::<Fold>().unwrap(), Fold::Twice);
    assert_eq!(
        "latest".parse::<MissedPolicy>().unwrap(),
        MissedPolicy::Latest
    );
    assert!(matches!(
        "sometimes".parse::<Fold>(),
        Err(Error::UnknownPolicy { what: "fold", .. })
    ));
    assert_eq!(
        DstPolicy::default(),
        DstPolicy {
            gap: Gap::Shift,
            fold: Fold::Once
        }
    );
}

// ----- real daylight-saving transitions ----------------------------------------------

#[test]
fn the_transitions_under_test_are_real() {
    // If the bundled tzdb ever changes these, the tests below lose their meaning.
    let ny = zone("America/New_York").unwrap();
    let gap = ny.to_ambiguous_timestamp(date(2026, 3, 8).at(2, 30, 0, 0));
    assert!(matches!(gap.offset(), AmbiguousOffset::Gap { .. }));
    let fold = ny.to_ambiguous_timestamp(date(2026, 11, 1).at(1, 30, 0, 0));
    assert!(matches!(fold.offset(), AmbiguousOffset::Fold { .. }));
    let lh = zone("Australia/Lord_Howe").unwrap();
    let gap = lh.to_ambiguous_timestamp(date(2026, 10, 4).at(2, 15, 0, 0));
    assert!(
        matches!(gap.offset(), AmbiguousOffset::Gap { before, after }
        if after.seconds() - before.seconds() == 1800)
    );
    let fold = lh.to_ambiguous_timestamp(date(2026, 4, 5).at(1, 45, 0, 0));
    assert!(matches!(fold.offset(), AmbiguousOffset::Fold { .. }));
}

#[test]
fn new_york_spring_forward_daily_0230() {
    let day = date(2026, 3, 8);
    let shift = sched("0 30 2 * * *", "America/New_York", Gap::Shift, Fold::Once);
    let ticks = ticks_on(&shift, day);
    assert_eq!(utcs(&ticks), ["2026-03-08T07:00:00Z"]);
    assert_eq!(ticks[0].kind, TickKind::Shifted);
    assert_eq!(ticks[0].local, day.at(2, 30, 0, 0));
    assert_eq!(ticks[0].offset.seconds(), -4 * 3600);

    let skip = sched("0 30 2 * * *", "America/New_York", Gap::Skip, Fold::Once);
    assert_eq!(ticks_on(&skip, day), []);
    // The days around are ordinary under both.
    for s in [&shift, &skip] {
        assert_eq!(
            utcs(&ticks_on(s, date(2026, 3, 7))),
            ["2026-03-07T07:30:00Z"]
        );
        assert_eq!(
            utcs(&ticks_on(s, date(2026, 3, 9))),
            ["2026-03-09T06:30:00Z"]
        );
    }
}

#[test]
fn new_york_fall_back_daily_0130() {
    let day = date(2026, 11, 1);
    let once = sched("0 30 1 * * *", "America/New_York", Gap::Shift, Fold::Once);
    let ticks = ticks_on(&once, day);
    assert_eq!(utcs(&ticks), ["2026-11-01T05:30:00Z"]);
    assert_eq!(ticks[0].kind, TickKind::Exact);

    let twice = sched("0 30 1 * * *", "America/New_York", Gap::Shift, Fold::Twice);
    let ticks = ticks_on(&twice, day);
    assert_eq!(
        utcs(&ticks),
        ["2026-11-01T05:30:00Z", "2026-11-01T06:30:00Z"]
    );
    assert_eq!(
        ticks.iter().map(|t| t.kind).collect::<Vec<_>>(),
        [TickKind::Exact, TickKind::Repeated]
    );
    assert!(ticks.iter().all(|t| t.local == day.at(1, 30, 0, 0)));
}

#[test]
fn daily_jobs_run_once_a_day_by_default_across_a_year() {
    // Every wall time of the day, in zones with 60- and 30-minute shifts: with the
    // default policy each calendar day of 2026 has exactly one tick.
    for tz in ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe"] {
        for (h, m) in [(0, 0), (1, 30), (1, 45), (2, 0), (2, 15), (2, 30), (3, 0)] {
            let s = sched(&format!("0 {m} {h} * * *"), tz, Gap::Shift, Fold::Once);
            let mut day = date(2026, 1, 1);
            while day.year() == 2026 {
                assert_eq!(ticks_on(&s, day).len(), 1, "{tz} {h}:{m} on {day}");
                day = day.tomorrow().unwrap();
            }
        }
    }
}

#[test]
fn hourly_and_every_minute_jobs_across_new_york_transitions() {
    let spring = date(2026, 3, 8);
    let fall = date(2026, 11, 1);
    for policy in POLICIES {
        let hourly = Schedule::parse("@hourly")
            .unwrap()
            .in_zone(zone("America/New_York").unwrap())
            .with_dst(policy);
        // 02:00 does not exist; shifted, it lands on 03:00's own tick and is absorbed.
        let ticks = ticks_on(&hourly, spring);
        assert_eq!(ticks.len(), 23, "{policy:?}");
        assert!(ticks.iter().all(|t| t.kind == TickKind::Exact));
        let ticks = ticks_on(&hourly, fall);
        let want = match policy.fold {
            Fold::Once => 24,
            Fold::Twice => 25,
        };
        assert_eq!(ticks.len(), want, "{policy:?}");

        let minutely = Schedule::parse("* * * * *")
            .unwrap()
            .in_zone(hourly.zone().clone())
            .with_dst(policy);
        assert_eq!(ticks_on(&minutely, spring).len(), 23 * 60, "{policy:?}");
        let want = match policy.fold {
            Fold::Once => 24 * 60,
            Fold::Twice => 25 * 60,
        };
        assert_eq!(ticks_on(&minutely, fall).len(), want, "{policy:?}");
    }
}

#[test]
fn no_two_ticks_share_an_instant() {
    // Ticks strictly increase, so an instant is never fired twice: checked for a day
    // either side of every transition of 2026, for hourly, half-hourly and daily jobs,
    // in each zone and policy.
    for tz in [
        "America/New_York",
        "Europe/Berlin",
        "Australia/Lord_Howe",
        "Asia/Kolkata",
    ] {
        let zone = zone(tz).unwrap();
        let year_start = "2026-01-01T00:00:00Z".parse::<Timestamp>().unwrap();
        let transitions: Vec<i64> = zone
            .following(year_start)
            .map(|t| t.timestamp().as_millisecond())
            .take_while(|at| *at < ms("2027-01-01T00:00:00Z"))
            .collect();
        if tz == "Asia/Kolkata" {
            assert!(transitions.is_empty());
        } else {
            assert_eq!(transitions.len(), 2, "{tz}");
        }
        for expr in ["@hourly", "0 */30 * * * *", "0 15 2 * * *"] {
            for policy in POLICIES {
                let s = Schedule::parse(expr)
                    .unwrap()
                    .in_zone(zone.clone())
                    .with_dst(policy);
                for at in transitions.iter().chain([&ms("2026-06-01T00:00:00Z")]) {
                    let (start, end) = (at - 86_400_000, at + 86_400_000);
                    let ticks: Vec<i64> = s
                        .ticks_after(start)
                        .take_while(|t| t.utc_ms < end)
                        .map(|t| t.utc_ms)
                        .collect();
                    assert!(!ticks.is_empty(), "{tz} {expr}: no ticks");
                    assert!(
                        ticks.windows(2).all(|w| w[1] > w[0]),
                        "{tz} {expr} {policy:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn europe_berlin_transitions() {
    let tz = "Europe/Berlin";
    let s = sched("0 30 2 * * *", tz, Gap::Shift, Fold::Once);
    assert_eq!(
        utcs(&ticks_on(&s, date(2026, 3, 29))),
        ["2026-03-29T01:00:00Z"]
    );
    let s = sched("0 30 2 * * *", tz, Gap::Skip, Fold::Once);
    assert_eq!(ticks_on(&s, date(2026, 3, 29)), []);
    let s = sched("0 30 2 * * *", tz, Gap::Shift, Fold::Twice);
    assert_eq!(
        utcs(&ticks_on(&s, date(2026, 10, 25))),
        ["2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z"]
    );
    let s = sched("0 30 2 * * *", tz, Gap::Shift, Fold::Once);
    assert_eq!(
        utcs(&ticks_on(&s, date(2026, 10, 25))),
        ["2026-10-25T00:30:00Z"]
    );
}

#[test]
fn lord_howe_half_hour_shift() {
    let tz = "Australia/Lord_Howe";
    // 2026-10-04: 02:00 +10:30 jumps to 02:30 +11:00 (15:30Z on the 3rd).
    let s = sched("0 15 2 * * *", tz, Gap::Shift, Fold::Once);
    let ticks = ticks_on(&s, date(2026, 10, 4));
    assert_eq!(utcs(&ticks), ["2026-10-03T15:30:00Z"]);
    assert_eq!(ticks[0].kind, TickKind::Shifted);
    let s = sched("0 15 2 * * *", tz, Gap::Skip, Fold::Once);
    assert_eq!(ticks_on(&s, date(2026, 10, 4)), []);
    // 2026-04-05: 02:00 +11:00 falls back to 01:30 +10:30 (15:00Z on the 4th).
    let s = sched("0 45 1 * * *", tz, Gap::Shift, Fold::Twice);
    assert_eq!(
        utcs(&ticks_on(&s, date(2026, 4, 5))),
        ["2026-04-04T14:45:00Z", "2026-04-04T15:15:00Z"]
    );
    let s = sched("0 45 1 * * *", tz, Gap::Shift, Fold::Once);
    assert_eq!(
        utcs(&ticks_on(&s, date(2026, 4, 5))),
        ["2026-04-04T14:45:00Z"]
    );
    // Hourly: 02:00 is in the gap (shifted to 02:30, or skipped); the fold
    // (01:30-02:00) holds no whole hour, so nothing repeats.
    for policy in POLICIES {
        let s = Schedule::parse("@hourly")
            .unwrap()
            .in_zone(zone(tz).unwrap())
            .with_dst(policy);
        let ticks = ticks_on(&s, date(2026, 10, 4));
        let shifted: Vec<String> = utcs(
            &ticks
                .iter()
                .filter(|t| t.kind == TickKind::Shifted)
                .copied()
                .collect::<Vec<_>>(),
        );
        match policy.gap {
            Gap::Shift => assert_eq!(shifted, ["2026-10-03T15:30:00Z"]),
            Gap::Skip => assert!(shifted.is_empty()),
        }
        let want = if policy.gap == Gap::Shift { 24 } else { 23 };
        assert_eq!(ticks.len(), want, "{policy:?}");
        assert_eq!(ticks_on(&s, date(2026, 4, 5)).len(), 24, "{policy:?}");
    }
}

#[test]
fn a_zone_without_dst_is_a_fixed_offset() {
    let s = sched("0 0 9 * * *", "Asia/Kolkata", Gap::Shift, Fold::Once);
    let ticks: Vec<Tick> = s
        .ticks_after(ms("2026-01-01T00:00:00Z"))
        .take(400)
        .collect();
    assert_eq!(utc(ticks[0].utc_ms), "2026-01-01T03:30:00Z");
    for pair in ticks.windows(2) {
        assert_eq!(pair[1].utc_ms - pair[0].utc_ms, 86_400_000);
    }
    assert!(ticks.iter().all(|t| t.kind == TickKind::Exact
        && t.offset.seconds() == 5 * 3600 + 1800
        && t.local.time() == jiff::civil::time(9, 0, 0, 0)));
}

// ----- the DST wrap against a second-by-second oracle ---------------------------

/// Every tick any policy could give in `(lo, hi]`, by brute force: every whole
/// second's wall clock, the cron fields (croner's matcher) and the zone's own account
/// of gaps and folds. A policy keeps a subset: see [`allowed`].
fn oracle(s: &Schedule, lo: i64, hi: i64) -> Vec<Tick> {
    let Rule::Cron(cron) = &s.rule else {
        panic!("oracle is for cron rules");
    };
    let tz = s.zone();
    let mut out = Vec::new();
    let mut sec = lo.div_euclid(1000) + 1;
    while sec * 1000 <= hi {
        let at = Timestamp::from_second(sec).unwrap();
        let offset = tz.to_offset(at);
        let wall = offset.to_datetime(at);
        let prev_offset = tz.to_offset(Timestamp::from_second(sec - 1).unwrap());
        if cron.is_time_matching(&wall).unwrap() {
            let kind = match tz.to_ambiguous_timestamp(wall).offset() {
                AmbiguousOffset::Fold { before, .. } if before != offset => TickKind::Repeated,
                _ => TickKind::Exact,
            };
            out.push(Tick {
                utc_ms: sec * 1000,
                local: wall,
                offset,
                kind,
            });
        } else if offset > prev_offset {
            // A gap ends here: the first of its wall times that matches, if any.
            let mut g = prev_offset.to_datetime(at);
            while g < wall {
                if cron.is_time_matching(&g).unwrap() {
                    out.push(Tick {
                        utc_ms: sec * 1000,
                        local: g,
                        offset,
                        kind: TickKind::Shifted,
                    });
                    break;
                }
                g = g.checked_add(SignedDuration::from_secs(1)).unwrap();
            }
        }
        sec += 1;
    }
    out
}

/// Whether `policy` fires a tick of this kind.
fn allowed(kind: TickKind, policy: DstPolicy) -> bool {
    match kind {
        TickKind::Exact => true,
        TickKind::Repeated => policy.fold == Fold::Twice,
        TickKind::Shifted => policy.gap == Gap::Shift,
    }
}

/// Transition instants to look around: gaps and folds of 60 and 30 minutes.
const TRANSITIONS: [(&str, &str); 6] = [
    ("America/New_York", "2026-03-08T07:00:00Z"),
    ("America/New_York", "2026-11-01T06:00:00Z"),
    ("Europe/Berlin", "2026-03-29T01:00:00Z"),
    ("Europe/Berlin", "2026-10-25T01:00:00Z"),
    ("Australia/Lord_Howe", "2026-10-03T15:30:00Z"),
    ("Australia/Lord_Howe", "2026-04-04T15:00:00Z"),
];

#[test]
fn ticks_match_a_second_by_second_oracle_around_transitions() {
    for (tz, at) in TRANSITIONS {
        let center = ms(at);
        let (lo, hi) = (center - 2 * 3_600_000, center + 2 * 3_600_000);
        for expr in [
            "0 * * * * *",
            "0 0 * * * *",
            "0 30 2 * * *",
            "0 45 1 * * *",
            "0 15 2 * * *",
            "*/20 15,45 1-3 * * *",
            "59 59 1 * * *",
            "0 0 3 * * *",
        ] {
            let plain = Schedule::parse(expr).unwrap().in_zone(zone(tz).unwrap());
            let candidates = oracle(&plain, lo, hi);
            for policy in POLICIES {
                let s = plain.clone().with_dst(policy);
                let got: Vec<Tick> = s.ticks_after(lo).take_while(|t| t.utc_ms <= hi).collect();
                let want: Vec<Tick> = candidates
                    .iter()
                    .filter(|t| allowed(t.kind, policy))
                    .copied()
                    .collect();
                assert_eq!(got, want, "{tz} {at} `{expr}` {policy:?}");
            }
        }
    }
}

// ----- missed runs ---------------------------------------------------------------

#[test]
fn missed_runs_under_each_policy() {
    let s = Schedule::parse("@hourly").unwrap();
    let done = ms("2026-05-01T10:00:00Z");
    // Due: 11:00 .. 15:00 (a tick at `now` is due).
    let now = ms("2026-05-01T15:00:00Z");
    let check = |policy, bound, want: &[&str], dropped| {
        let m = missed(&s, done, now, policy, bound);
        assert_eq!(utcs(&m.fire), want, "{policy:?} {bound}");
        assert_eq!(m.dropped, Count::Exact(dropped), "{policy:?} {bound}");
    };
    check(MissedPolicy::Skip, 10, &[], 5);
    check(MissedPolicy::Latest, 10, &["2026-05-01T15:00:00Z"], 4);
    check(
        MissedPolicy::All,
        3,
        &[
            "2026-05-01T13:00:00Z",
            "2026-05-01T14:00:00Z",
            "2026-05-01T15:00:00Z",
        ],
        2,
    );
    check(
        MissedPolicy::All,
        10,
        &[
            "2026-05-01T11:00:00Z",
            "2026-05-01T12:00:00Z",
            "2026-05-01T13:00:00Z",
            "2026-05-01T14:00:00Z",
            "2026-05-01T15:00:00Z",
        ],
        0,
    );
    check(MissedPolicy::All, 0, &[], 5);
    // Nothing due.
    let m = missed(&s, now, now, MissedPolicy::All, 10);
    assert_eq!((m.fire.len(), m.dropped), (0, Count::Exact(0)));
    let m = missed(&s, now, done, MissedPolicy::All, 10);
    assert_eq!((m.fire.len(), m.dropped), (0, Count::Exact(0)));
}

#[test]
fn missed_every_ticks_are_counted_without_walking_them() {
    let anchor = 7_000;
    let s = Schedule::parse("@every 1s").unwrap().anchored_at(anchor);
    let done = ms("2025-01-01T00:00:00Z");
    let now = ms("2026-01-01T00:00:00Z") + 500;
    let m = missed(&s, done, now, MissedPolicy::All, 3);
    // The grid is at .000 + 7 s: the last three whole seconds up to `now`.
    assert_eq!(
        m.fire.iter().map(|t| t.utc_ms).collect::<Vec<_>>(),
        [now - 2_500, now - 1_500, now - 500]
    );
    assert_eq!(m.dropped, Count::Exact(365 * 86_400 - 3));
    let m = missed(&s, done, now, MissedPolicy::Latest, 0);
    assert_eq!(m.fire.len(), 1);
    assert_eq!(m.dropped, Count::Exact(365 * 86_400 - 1));
}

#[test]
fn missed_stops_counting_a_dense_cron_and_still_finds_the_newest() {
    let s = Schedule::parse("* * * * * *").unwrap();
    let done = ms("2026-05-01T00:00:00Z");
    let now = ms("2026-05-03T00:00:00Z");
    let m = missed(&s, done, now, MissedPolicy::All, 3);
    assert_eq!(
        utcs(&m.fire),
        [
            "2026-05-02T23:59:58Z",
            "2026-05-02T23:59:59Z",
            "2026-05-03T00:00:00Z"
        ]
    );
    assert_eq!(m.dropped, Count::AtLeast(COUNT_LIMIT - 3));
}

// ----- job names and tick ids ------------------------------------------------------

#[test]
fn job_names_are_subject_safe() {
    for good in ["a", "backup", "nightly-report_2", "A-b-C", &"x".repeat(128)] {
        assert!(JobName::new(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        "a.b",
        "a b",
        "a*",
        "a>",
        "é",
        "trailing-",
        &"x".repeat(129),
    ] {
        assert!(
            matches!(JobName::new(bad), Err(Error::InvalidJobName { .. })),
            "{bad}"
        );
    }
}

#[test]
fn tick_ids_are_stable_and_read_back() {
    let job = JobName::new("nightly-report").unwrap();
    assert_eq!(
        tick_id(&job, 1_772_953_200_000),
        "nightly-report-1772953200000"
    );
    assert_eq!(tick_id(&job, -5_000), "nightly-report--5000");
    assert_eq!(
        parse_tick_id("nightly-report-1772953200000").unwrap(),
        (job.clone(), 1_772_953_200_000)
    );
    assert_eq!(
        parse_tick_id("nightly-report--5000").unwrap(),
        (job, -5_000)
    );
    for bad in [
        "", "job", "job-", "-5", "job-01", "job.x-5", "job-5x", "job---5",
    ] {
        assert!(
            matches!(parse_tick_id(bad), Err(Error::InvalidTickId(_))),
            "{bad}"
        );
    }
}

// ----- properties ----------------------------------------------------------------

/// One generated cron field: its text and the values it allows.
#[derive(Debug, Clone)]
struct GenField {
    text: String,
    values: Vec<u8>,
    star: bool,
}

/// Values from `lo..=hi` (days only up to 28, so that every expression fires); a step
/// `*/n` runs over the field's whole range `lo..=top`, as croner reads it.
fn gen_field(lo: u8, hi: u8, top: u8) -> impl Strategy<Value = GenField> {
    prop_oneof![
        Just(GenField {
            text: "*".into(),
            values: (lo..=hi).collect(),
            star: true
        }),
        (lo..=hi).prop_map(|v| GenField {
            text: v.to_string(),
            values: vec![v],
            star: false
        }),
        (lo..=hi, lo..=hi).prop_map(|(a, b)| {
            let (a, b) = (a.min(b), a.max(b));
            GenField {
                text: format!("{a}-{b}"),
                values: (a..=b).collect(),
                star: false,
            }
        }),
        (1..=(hi - lo + 1)).prop_map(move |n| GenField {
            text: format!("*/{n}"),
            values: (lo..=top).step_by(n as usize).collect(),
            star: false
        }),
        proptest::collection::btree_set(lo..=hi, 1..4).prop_map(|set| GenField {
            text: set
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(","),
            values: set.into_iter().collect(),
            star: false
        }),
    ]
}

#[derive(Debug, Clone)]
struct GenExpr {
    fields: Vec<GenField>,
    and: bool,
}

impl GenExpr {
    fn text(&self) -> String {
        let mut parts: Vec<String> = self.fields.iter().map(|f| f.text.clone()).collect();
        if self.and {
            parts[5] = format!("+{}", parts[5]);
        }
        parts.join(" ")
    }

    /// The fields checked without croner: croner's day rule (a literal `*` in one day
    /// field leaves the other alone; both restricted: OR, or AND with `+`).
    fn matches(&self, w: DateTime) -> bool {
        let has = |i: usize, v: i8| self.fields[i].values.contains(&(v as u8));
        let dom = has(3, w.day());
        let weekday = w.weekday().to_sunday_zero_offset();
        let dow = has(5, weekday) || (weekday == 0 && has(5, 7));
        let (sd, sw) = (self.fields[3].star, self.fields[5].star);
        let day = match (sd, sw) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) if self.and => dom && dow,
            (false, false) => dom || dow,
        };
        has(0, w.second()) && has(1, w.minute()) && has(2, w.hour()) && has(4, w.month()) && day
    }
}

fn gen_expr() -> impl Strategy<Value = GenExpr> {
    (
        (
            gen_field(0, 59, 59),
            gen_field(0, 59, 59),
            gen_field(0, 23, 23),
        ),
        (
            gen_field(1, 28, 31),
            gen_field(1, 12, 12),
            gen_field(0, 7, 7),
        ),
        any::<bool>(),
    )
        .prop_map(|((s, m, h), (dom, mon, dow), and)| GenExpr {
            fields: vec![s, m, h, dom, mon, dow],
            and,
        })
}

const ZONES: [&str; 8] = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "America/Sao_Paulo",
    "Pacific/Chatham",
    "Antarctica/Troll",
];

fn gen_policy() -> impl Strategy<Value = DstPolicy> {
    (0..4usize).prop_map(|i| POLICIES[i])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn ticks_are_later_increasing_and_match_the_fields(
        expr in gen_expr(),
        zi in 0..ZONES.len(),
        policy in gen_policy(),
        after in ms("1990-01-01T00:00:00Z")..ms("2060-01-01T00:00:00Z"),
    ) {
        let s = Schedule::parse(&expr.text()).unwrap()
            .in_zone(zone(ZONES[zi]).unwrap())
            .with_dst(policy);
        let tz = s.zone().clone();
        let ticks: Vec<Tick> = s.ticks_after(after).take(12).collect();
        prop_assert!(!ticks.is_empty());
        prop_assert!(ticks[0].utc_ms > after);
        prop_assert_eq!(Some(ticks[0]), s.next_after(after));
        for pair in ticks.windows(2) {
            prop_assert!(pair[1].utc_ms > pair[0].utc_ms);
        }
        for t in &ticks {
            prop_assert_eq!(t.utc_ms % 1000, 0);
            // The wall time named matches the fields, always.
            prop_assert!(expr.matches(t.local), "{} does not match {}", t.local, expr.text());
            let at = t.utc();
            prop_assert_eq!(t.offset, tz.to_offset(at));
            let amb = tz.to_ambiguous_timestamp(t.local);
            match t.kind {
                // The instant is the wall time's (its first occurrence).
                TickKind::Exact => {
                    prop_assert_eq!(t.offset.to_datetime(at), t.local);
                    if let AmbiguousOffset::Fold { before, .. } = amb.offset() {
                        prop_assert_eq!(before, t.offset);
                    }
                }
                // Its second occurrence, and only when the policy says twice.
                TickKind::Repeated => {
                    prop_assert_eq!(policy.fold, Fold::Twice);
                    prop_assert_eq!(t.offset.to_datetime(at), t.local);
                    let is_second = matches!(amb.offset(),
                        AmbiguousOffset::Fold { after, .. } if after == t.offset);
                    prop_assert!(is_second);
                }
                // A wall time in a gap, fired at the gap's end, only under shift.
                TickKind::Shifted => {
                    prop_assert_eq!(policy.gap, Gap::Shift);
                    let in_gap = matches!(amb.offset(), AmbiguousOffset::Gap { .. });
                    prop_assert!(in_gap);
                    let just_before = Timestamp::from_millisecond(t.utc_ms - 1).unwrap();
                    prop_assert!(tz.to_offset(just_before) < t.offset);
                    prop_assert!(t.offset.to_datetime(at) > t.local);
                }
            }
        }
    }

    #[test]
    fn every_ticks_lie_on_the_anchored_grid(
        period_s in 1i64..10_000_000,
        anchor in -4_000_000_000_000i64..4_000_000_000_000,
        after in -4_000_000_000_000i64..4_000_000_000_000,
    ) {
        let s = Schedule::parse(&format!("@every {period_s}s")).unwrap().anchored_at(anchor);
        let p = period_s * 1000;
        let t = s.next_after(after).unwrap();
        prop_assert!(t.utc_ms > after);
        prop_assert!(t.utc_ms - after <= p);
        prop_assert_eq!((t.utc_ms - anchor).rem_euclid(p), 0);
    }

    #[test]
    fn tick_ids_read_back(name in "[A-Za-z0-9_-]{0,127}[A-Za-z0-9_]", at in any::<i64>()) {
        let job = JobName::new(name).unwrap();
        let id = tick_id(&job, at);
        prop_assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        prop_assert_eq!(parse_tick_id(&id).unwrap(), (job, at));
    }

    #[test]
    fn missed_fires_the_newest_and_accounts_for_the_rest(
        expr in prop::sample::select(vec!["0 */7 * * * *", "@hourly", "0 30 2 * * *", "@every 45m"]),
        zi in 0..ZONES.len(),
        done in ms("2026-01-01T00:00:00Z")..ms("2026-12-01T00:00:00Z"),
        span in 0i64..3 * 86_400_000,
        bound in 0usize..20,
    ) {
        let s = Schedule::parse(expr).unwrap().in_zone(zone(ZONES[zi]).unwrap());
        let now = done + span;
        let due: Vec<Tick> = s.ticks_after(done).take_while(|t| t.utc_ms <= now).collect();
        let m = missed(&s, done, now, MissedPolicy::All, bound);
        let keep = due.len().min(bound);
        prop_assert_eq!(&m.fire[..], &due[due.len() - keep..]);
        prop_assert_eq!(m.dropped, Count::Exact((due.len() - keep) as u64));
        let latest = missed(&s, done, now, MissedPolicy::Latest, 0);
        prop_assert_eq!(latest.fire.last(), due.last());
    }
}
