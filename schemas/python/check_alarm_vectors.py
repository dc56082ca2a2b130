#!/usr/bin/env python3
"""Independent check of the alarm-loader's golden vectors (schemas/alarm-vectors.json).

Everything here is derived from schemas/alarms.md only (no Rust source): partitions
(blake3), buckets, the stored subjects and the due entry, firing ids, tick ids and
their parsing, the backoff, the JSON shape of every Record and the transition table
(each life is replayed record by record), the CronJob as stored and its tick alarm,
planning of missed runs (arithmetic for `@every`, the tick rules for cron
expressions), and the ticks of cron expressions across daylight-saving changes
(zoneinfo, with the tz database of the pinned `tzdata` package, not the host's).

The cron expressions here are the subset the vectors use: numbers, `*`, ranges, steps
and lists in 5 or 6 fields (no names, `L`, `W`, `#`).

Usage:
    python3 check_alarm_vectors.py [path/to/alarm-vectors.json]

Exit status 0 when every check passes (and every altered copy of the vectors is
refused), 1 on the first mismatch, 2 when the file cannot be read.
Set CHECK_VECTORS_VERBOSE=1 to list each negative check and its rejection.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import os
import re
import sys
import zoneinfo
from pathlib import Path

try:
    import blake3
    import tzdata  # noqa: F401  (zoneinfo reads it: see zone())
except ImportError as e:  # pragma: no cover
    sys.exit(f"missing dependency ({e}); pip install -r requirements.txt")

# The zone rules come from the pinned tzdata package only.
zoneinfo.reset_tzpath(to=[])

VERBOSE = bool(os.environ.get("CHECK_VECTORS_VERBOSE"))
CHECKS: list[str] = []

PARTITIONS = 32
BUCKET_MS = 10_000
MISSED_AFTER_MS = 30_000
MAX_TICKS_A_ROUND = 1000
U64 = 2**64 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


class CheckFailed(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)
    CHECKS.append(what)


def check_eq(got, want, what: str) -> None:
    if got != want:
        raise CheckFailed(f"{what}\n    expected: {want!r}\n    computed: {got!r}")
    CHECKS.append(what)


def is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= U64


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and I64_MIN <= x <= I64_MAX


def members(obj, required: set[str], what: str, optional: set[str] = frozenset()) -> None:
    check(isinstance(obj, dict), f"{what}: an object")
    keys = set(obj)
    check(required <= keys and keys <= required | optional,
          f"{what}: members {sorted(keys)} (want {sorted(required)} + optional {sorted(optional)})")


# --- alarms.md "Storage" -------------------------------------------------------------

def partition_of(id_: str) -> int:
    h = blake3.blake3(id_.encode()).digest()
    return int.from_bytes(h[:4], "little") % PARTITIONS


def firing_id(doc: dict, id_: str, set_seq: int, due_ms: int) -> str:
    """alarms.md "Firing": alarm-<id>-<set_seq>-<due_ms>-<tag>, the tag the first 8
    bytes (hex) of BLAKE3 keyed with the firing key over the parts, each followed by 0."""
    key = bytes.fromhex(doc["firing_key_hex"])
    h = blake3.blake3(key=key)
    for part in (b"turnstile/alarm-firing/v1", id_.encode(), str(set_seq).encode(), str(due_ms).encode()):
        h.update(part)
        h.update(b"\0")
    return f"alarm-{id_}-{set_seq}-{due_ms}-{h.digest()[:8].hex()}"


def bucket_of(ms: int) -> int:
    return ms // BUCKET_MS


def backoff(retry: dict, attempt: int) -> int:
    d = retry["backoff_ms"] * 2 ** min(attempt - 1, 40)
    return min(min(d, U64), retry["max_backoff_ms"])


def check_storage(doc: dict) -> None:
    prefix = doc["prefix"]
    c = doc["constants"]
    check_eq((c["partitions"], c["bucket_ms"], c["missed_after_ms"], c["max_ticks_a_round"]),
             (PARTITIONS, BUCKET_MS, MISSED_AFTER_MS, MAX_TICKS_A_ROUND), "constants")
    lengths = set()
    for v in doc["partitions"]:
        check(TOKEN.match(v["id"]) and len(v["id"]) <= 128, f"id {v['id']!r} is a valid alarm id")
        lengths.add(len(v["id"]))
        check_eq(v["partition"], partition_of(v["id"]), f"partition of {v['id']!r}")
    check({1, 128} <= lengths, "partition vectors include 1- and 128-character ids")
    for v in doc["buckets"]:
        check_eq(v["bucket"], bucket_of(v["ms"]), f"bucket of {v['ms']}")
    for v in doc["due_index"]:
        id_, at = v["id"], v["at_ms"]
        p, b = partition_of(id_), bucket_of(at)
        check_eq((v["partition"], v["bucket"]), (p, b), f"due index of {id_!r}: partition, bucket")
        check_eq(v["due_subject"], f"{prefix}.alarms.due.{p}.{b}.{id_}", f"due subject of {id_!r}")
        check_eq(v["due_bucket_filter"], f"{prefix}.alarms.due.{p}.{b}.*", f"bucket filter of {id_!r}")
        check_eq(v["record_subject"], f"{prefix}.alarms.rec.{id_}", f"record subject of {id_!r}")
        check_eq(v["swept_subject"], f"{prefix}.alarms.swept.{p}", f"swept subject of {id_!r}")
        check(re.fullmatch(r"0|[1-9][0-9]*", v["swept_payload"]) is not None, "swept payload is decimal")
        e = v["entry"]
        members(e, {"id", "at_ms"}, f"due entry of {id_!r}", {"written_ms"})
        check_eq((e["id"], e["at_ms"]), (id_, at), f"due entry of {id_!r}")
        check(is_uint(e.get("written_ms", 0)), f"due entry of {id_!r}: written_ms")
    for v in doc["cron_subjects"]:
        n = v["name"]
        p = partition_of(n)
        check_eq(v["partition"], p, f"partition of job {n!r}")
        check_eq(v["job_subject"], f"{prefix}.alarms.cron.{p}.{n}", f"job subject of {n!r}")
        check_eq(v["tick_subject"], f"{prefix}.alarms.crontick.{p}.{n}", f"crontick subject of {n!r}")
    for v in doc["backoff"]:
        r = v["retry"]
        for d in v["delays"]:
            check_eq(d["delay_ms"], backoff(r, d["attempt"]), f"backoff {r} after attempt {d['attempt']}")


# --- alarms.md "Tick ids" ------------------------------------------------------------

def valid_name(n: str, most: int = 128) -> bool:
    return 1 <= len(n) <= most and TOKEN.match(n) is not None and not n.endswith("-")


def tick_id(name: str, ms: int) -> str:
    return f"{name}-{ms}"


def parse_tick_id(id_: str):
    m = re.search(r"[0-9]+$", id_)
    if not m:
        return None
    head, number = id_[: m.start()], m.group()
    if not head.endswith("-"):
        return None
    head = head[:-1]
    if head.endswith("-"):
        head, number = head[:-1], "-" + number
    ms = int(number)
    if not (I64_MIN <= ms <= I64_MAX) or not valid_name(head):
        return None
    if tick_id(head, ms) != id_:
        return None
    return {"job": head, "tick_ms": ms}


def check_tick_ids(doc: dict) -> None:
    for v in doc["tick_ids"]:
        n, ms = v["job"], v["tick_ms"]
        check_eq(v["tick_id"], tick_id(n, ms), f"tick id of {n!r} at {ms}")
        check_eq(v["parsed"], parse_tick_id(v["tick_id"]), f"tick id {v['tick_id']!r} read back")
        check_eq(v["parsed"], {"job": n, "tick_ms": ms}, f"tick id {v['tick_id']!r} round trip")
        want = f"cron-{tick_id(n, ms)}" if ms >= 0 else None
        check_eq(v["alarm_id"], want, f"tick alarm id of {n!r} at {ms}")
    refused = 0
    for v in doc["tick_id_parse"]:
        got = parse_tick_id(v["id"])
        check_eq(v["parsed"], got, f"reading tick id {v['id']!r}")
        refused += got is None
    check(refused >= 5, "several ids that are not tick ids are refused")


# --- alarms.md "A Record exactly" and the transitions -------------------------------

STATUS = {
    "pending": {"next_ms", "attempts"},
    "dispatching": {"attempt", "since_ms", "by"},
    "done": {"at_ms", "slot"},
    "dead": {"at_ms", "reason"},
    "cancelled": {"at_ms"},
    "skipped": {"at_ms", "reason"},
}
EVENT = {
    "set": {"at_ms"},
    "attempt": {"attempt", "at_ms", "by"},
    "delivered": {"attempt", "at_ms", "lateness_ms", "slot", "duplicate"},
    "failed": {"attempt", "at_ms", "reason"},
    "retry_asked": {"attempt", "at_ms", "in_ms"},
    "dead_lettered": {"at_ms", "reason"},
    "cancelled": {"at_ms"},
    "skipped": {"at_ms", "reason"},
}
FINAL = {"done", "dead", "cancelled", "skipped"}


def check_fields(obj: dict, what: str) -> None:
    for k, x in obj.items():
        if k in ("status", "event"):
            continue
        if k in ("by", "reason"):
            check(isinstance(x, str), f"{what}.{k}: a string")
        elif k == "slot":
            check(x is None or is_uint(x), f"{what}.slot: a number or null")
        elif k == "duplicate":
            check(isinstance(x, bool), f"{what}.duplicate: a boolean")
        elif k == "lateness_ms":
            check(is_int(x), f"{what}.lateness_ms: an integer")
        else:
            check(is_uint(x), f"{what}.{k}: a non-negative integer")


def check_alarm(a: dict, what: str) -> None:
    members(a, {"id", "due_ms", "target", "body", "headers", "dispatch_timeout_ms", "retry"},
            what, {"cron"})
    check(isinstance(a["id"], str) and TOKEN.match(a["id"]) is not None and len(a["id"]) <= 160,
          f"{what}.id")
    check(is_uint(a["due_ms"]), f"{what}.due_ms")
    t = a["target"]
    check(isinstance(t, dict) and len(t) == 1 and set(t) <= {"process", "subject"}
          and isinstance(next(iter(t.values())), str), f"{what}.target")
    try:
        body = base64.b64decode(a["body"], validate=True)
    except ValueError as e:
        raise CheckFailed(f"{what}.body: not base64: {e}") from e
    check(base64.b64encode(body).decode() == a["body"] and len(body) <= 256 * 1024,
          f"{what}.body: standard base64")
    check(isinstance(a["headers"], list) and all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)
        and not h[0].lower().startswith(("nats-", "ts-")) for h in a["headers"]), f"{what}.headers")
    check(is_uint(a["dispatch_timeout_ms"]) and 1 <= a["dispatch_timeout_ms"] <= 600_000,
          f"{what}.dispatch_timeout_ms")
    r = a["retry"]
    members(r, {"attempts", "backoff_ms", "max_backoff_ms"}, f"{what}.retry")
    check(1 <= r["attempts"] <= 1000 and r["max_backoff_ms"] >= r["backoff_ms"], f"{what}.retry")
    if "cron" in a:
        c = a["cron"]
        members(c, {"job", "tick_ms"}, f"{what}.cron", {"after", "fan_out"})
        check_eq(a["id"], f"cron-{c['job']}-{c['tick_ms']}", f"{what}: a tick's alarm id")
        check_eq(a["due_ms"], c["tick_ms"], f"{what}: a tick's alarm is due at the tick")
        if "after" in c:
            check(parse_tick_id(c["after"][len("cron-"):]) is not None and c["after"].startswith("cron-")
                  and parse_tick_id(c["after"][5:])["job"] == c["job"], f"{what}.cron.after")
    else:
        check(not a["id"].startswith("cron-") and len(a["id"]) <= 128, f"{what}.id: a client's id")


def check_record_shape(r: dict, what: str) -> None:
    members(r, {"v", "alarm", "set_seq", "status", "event"}, what)
    check_eq(r["v"], 1, f"{what}.v")
    check(is_uint(r["set_seq"]), f"{what}.set_seq")
    check_alarm(r["alarm"], f"{what}.alarm")
    s, e = r["status"], r["event"]
    check(isinstance(s, dict) and s.get("status") in STATUS, f"{what}.status: a known variant")
    members(s, STATUS[s["status"]] | {"status"}, f"{what}.status {s['status']}")
    check_fields(s, f"{what}.status")
    check(isinstance(e, dict) and e.get("event") in EVENT, f"{what}.event: a known variant")
    members(e, EVENT[e["event"]] | {"event"}, f"{what}.event {e['event']}")
    check_fields(e, f"{what}.event")


def expected_next(prev: dict | None, r: dict, what: str):
    """The status (and alarm) the transition table gives for r's event after prev."""
    e = r["event"]
    kind, t = e["event"], e["at_ms"]
    if kind == "set":
        check_eq(r["set_seq"], 0, f"{what}: a set record is stored with set_seq 0")
        a = r["alarm"]
        return {"status": "pending", "next_ms": max(a["due_ms"], t), "attempts": 0}, a
    check(prev is not None, f"{what}: the first record is a set")
    st, alarm = prev["status"], copy.deepcopy(prev["alarm"])
    check(st["status"] not in FINAL or kind == "set", f"{what}: {kind} after final {st['status']}")
    if kind == "attempt":
        check(st["status"] in ("pending", "dispatching"), f"{what}: attempt follows pending/dispatching")
        a = st["attempts"] + 1 if st["status"] == "pending" else st["attempt"]
        check_eq(e["attempt"], a, f"{what}: attempt number")
        return {"status": "dispatching", "attempt": a, "since_ms": t, "by": e["by"]}, alarm
    if kind in ("cancelled", "skipped"):
        if kind == "skipped":
            check("cron" in alarm, f"{what}: only a cron tick's alarm is skipped")
            return {"status": "skipped", "at_ms": t, "reason": e["reason"]}, alarm
        return {"status": "cancelled", "at_ms": t}, alarm
    check_eq(st["status"], "dispatching", f"{what}: {kind} follows dispatching")
    a = st["attempt"]
    if kind == "delivered":
        check_eq(e["attempt"], a, f"{what}: delivered attempt")
        check_eq(e["lateness_ms"], st["since_ms"] - alarm["due_ms"], f"{what}: lateness")
        return {"status": "done", "at_ms": t, "slot": e["slot"]}, alarm
    retry = alarm["retry"]
    if kind == "failed":
        check_eq(e["attempt"], a, f"{what}: failed attempt")
        check(a < retry["attempts"], f"{what}: failed (not dead) with attempts left")
        return {"status": "pending", "next_ms": t + backoff(retry, a), "attempts": a}, alarm
    if kind == "dead_lettered":
        check(a >= retry["attempts"], f"{what}: dead with no attempt left")
        m = re.fullmatch(r"attempt (\d+) of (\d+): (.*)", e["reason"], re.S)
        check(m is not None and (int(m[1]), int(m[2])) == (a, retry["attempts"]),
              f"{what}: dead_lettered reason names the attempt")
        return {"status": "dead", "at_ms": t, "reason": m[3]}, alarm
    if kind == "retry_asked":
        check_eq(e["attempt"], a, f"{what}: retry_asked attempt")
        alarm["due_ms"] = t + e["in_ms"]
        alarm["body"] = r["alarm"]["body"]  # the body sent, if any
        return {"status": "pending", "next_ms": t + e["in_ms"], "attempts": 0}, alarm
    raise CheckFailed(f"{what}: unknown event {kind}")


def check_lives(doc: dict) -> None:
    seen_events, seen_status = set(), set()
    for life in doc["lives"]:
        name, grace = life["name"], life["grace_ms"]
        prev, prev_seq, set_seq = None, 0, None
        for i, step in enumerate(life["records"]):
            what = f"life {name} record {i}"
            r, seq = step["record"], step["seq"]
            check(seq > prev_seq, f"{what}: stream sequences increase")
            check_record_shape(r, what)
            status, alarm = expected_next(prev, r, what)
            check_eq(r["status"], status, f"{what}: status after {r['event']['event']}")
            check_eq(r["alarm"], alarm, f"{what}: alarm")
            if r["event"]["event"] == "set":
                set_seq = seq
            else:
                check_eq(r["set_seq"], set_seq, f"{what}: set_seq is the set record's sequence")
            a = r["alarm"]
            check_eq(step["firing_id"], firing_id(doc, a["id"], set_seq, a["due_ms"]), f"{what}: firing id")
            s = r["status"]
            final = s["status"] in FINAL
            check_eq(step["final"], final, f"{what}: final")
            nxt = (s["next_ms"] if s["status"] == "pending"
                   else s["since_ms"] + a["dispatch_timeout_ms"] + grace if s["status"] == "dispatching"
                   else None)
            check_eq(step["next_action_ms"], nxt, f"{what}: next action")
            seen_events.add(r["event"]["event"])
            seen_status.add(s["status"])
            prev, prev_seq = r, seq
    check_eq(seen_events, set(EVENT), "the lives hold every event")
    check_eq(seen_status, set(STATUS), "the lives hold every status")


# --- ticks: alarms.md "Ticks of a schedule" -------------------------------------------

def parse_every(text: str) -> int:
    m = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not m or not text:
        raise CheckFailed(f"@every {text!r}: not a duration")
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    ms = ((d * 24 + h) * 60 + mi) * 60_000 + s * 1000
    check(ms >= 1000, f"@every {text}: at least 1 s")
    return ms


ALIASES = {"@yearly": "0 0 0 1 1 *", "@annually": "0 0 0 1 1 *", "@monthly": "0 0 0 1 * *",
           "@weekly": "0 0 0 * * 0", "@daily": "0 0 0 * * *", "@midnight": "0 0 0 * * *",
           "@hourly": "0 0 * * * *"}


def parse_field(text: str, lo: int, hi: int) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        rng, _, step = part.partition("/")
        if rng in ("*", "?"):
            a, b = lo, hi
        elif "-" in rng:
            a, b = (int(x) for x in rng.split("-"))
        else:
            a = b = int(rng)
            if step:
                b = hi
        out.update(range(a, b + 1, int(step) if step else 1))
    return out


class Cron:
    def __init__(self, expr: str):
        expr = ALIASES.get(expr, expr)
        f = expr.split()
        if len(f) == 5:
            f = ["0"] + f
        check(len(f) == 6, f"{expr!r}: 5 or 6 fields")
        self.sec, self.min, self.hour = (parse_field(f[i], 0, r) for i, r in ((0, 59), (1, 59), (2, 23)))
        self.dom, self.mon = parse_field(f[3], 1, 31), parse_field(f[4], 1, 12)
        self.dow = {d % 7 for d in parse_field(f[5].lstrip("+"), 0, 7)}
        self.dom_star, self.dow_star = f[3] in ("*", "?"), f[5] in ("*", "?")
        self.both = f[5].startswith("+")

    def day(self, d: dt.date) -> bool:
        if d.month not in self.mon:
            return False
        dom, dow = d.day in self.dom, (d.isoweekday() % 7) in self.dow
        if self.dom_star or self.dow_star or self.both:
            return dom and dow
        return dom or dow  # Vixie cron: either

    def walls(self, day: dt.date):
        if self.day(day):
            for h in sorted(self.hour):
                for m in sorted(self.min):
                    for s in sorted(self.sec):
                        yield dt.datetime(day.year, day.month, day.day, h, m, s)


def zone(name: str):
    return dt.timezone.utc if name == "UTC" else zoneinfo.ZoneInfo(name)


def ms_of(t: dt.datetime) -> int:
    return int(t.timestamp()) * 1000


def offset_at(tz, ms: int) -> int:
    return int(dt.datetime.fromtimestamp(ms / 1000, tz).utcoffset().total_seconds())


def instants(wall: dt.datetime, tz) -> list[int]:
    """The instants (ms) a wall time names in tz: one, two (a fold) or none (a gap)."""
    out = []
    for fold in (0, 1):
        t = wall.replace(tzinfo=tz, fold=fold)
        ms = ms_of(t)
        back = dt.datetime.fromtimestamp(ms / 1000, tz).replace(tzinfo=None)
        if back == wall and ms not in out:
            out.append(ms)
    return sorted(out)


def gap_end(wall: dt.datetime, tz) -> int:
    """The transition instant of the gap that holds `wall`."""
    lo = ms_of(wall.replace(tzinfo=tz, fold=1))  # offset after: before the transition
    hi = ms_of(wall.replace(tzinfo=tz, fold=0))  # offset before: after it
    lo, hi = min(lo, hi), max(lo, hi)
    after = offset_at(tz, hi)
    while hi - lo > 1000:
        mid = (lo + hi) // 2 // 1000 * 1000
        if offset_at(tz, mid) == after:
            hi = mid
        else:
            lo = mid
    return hi


def cron_ticks(expr: str, tzname: str, gap: str, fold: str, after: int, n: int) -> list[dict]:
    cron, tz = Cron(expr), zone(tzname)
    day = dt.datetime.fromtimestamp(after / 1000, tz).date() - dt.timedelta(days=2)
    ticks: dict[int, dict] = {}
    for _ in range(800):
        for wall in cron.walls(day):
            local = wall.isoformat()
            found = instants(wall, tz)
            if not found:
                if gap == "shift":
                    at = gap_end(wall, tz)
                    ticks.setdefault(at, {"utc_ms": at, "local": local, "kind": "shifted"})
                continue
            for i, at in enumerate(found if fold == "twice" else found[:1]):
                ticks[at] = {"utc_ms": at, "local": local, "kind": "repeated" if i else "exact"}
        day += dt.timedelta(days=1)
        later = sorted(t for t in ticks if t > after)
        if len(later) >= n and ms_of(dt.datetime.combine(day, dt.time(), tz)) - 2 * 86_400_000 > later[n - 1]:
            break
    out = [ticks[t] for t in sorted(ticks) if t > after][:n]
    for t in out:
        t["offset_seconds"] = offset_at(tz, t["utc_ms"])
    return out


def check_dst(doc: dict) -> None:
    kinds = set()
    for v in doc["dst"]:
        what = f"{v['schedule']!r} in {v['tz']} (gap {v['dst_gap']}, fold {v['dst_fold']}) after {v['after_ms']}"
        got = cron_ticks(v["schedule"], v["tz"], v["dst_gap"], v["dst_fold"], v["after_ms"], len(v["ticks"]))
        check_eq(got, v["ticks"], f"ticks of {what}")
        kinds |= {t["kind"] for t in got}
    check_eq(kinds, {"exact", "shifted", "repeated"}, "the DST vectors hold every kind of tick")


# --- cron jobs: alarms.md "Cron jobs", "Planning (missed runs)" ---------------------

JOB_FIELDS = {"name", "schedule", "tz", "active", "overlap", "strategy", "missed", "missed_bound",
              "missed_grace_ms", "dst_gap", "dst_fold", "target", "body", "headers", "dispatch_timeout_ms", "retry",
              "created_ms"}
DEFAULTS = {"tz": "UTC", "active": True, "overlap": "allow", "strategy": "one", "missed": "skip",
            "missed_bound": 10, "missed_grace_ms": 30000, "dst_gap": "shift", "dst_fold": "once", "body": "", "headers": [],
            "dispatch_timeout_ms": 5000, "retry": {"attempts": 5, "backoff_ms": 1000, "max_backoff_ms": 60000},
            "created_ms": 0}


def check_job(j: dict, what: str) -> None:
    members(j, JOB_FIELDS, what)
    check(valid_name(j["name"], 100), f"{what}.name")
    check(j["overlap"] in ("allow", "skip"), f"{what}.overlap")
    check(j["strategy"] == "one" or (isinstance(j["strategy"], dict) and set(j["strategy"]) == {"all"}
                                     and "subject" in j["target"]), f"{what}.strategy")
    check(j["missed"] in ("skip", "latest", "all") and 1 <= j["missed_bound"] <= 1000, f"{what}.missed")
    check(j["dst_gap"] in ("shift", "skip") and j["dst_fold"] in ("once", "twice"), f"{what}.dst")
    check_alarm({"id": "x", "due_ms": 0, "target": j["target"], "body": j["body"], "headers": j["headers"],
                 "dispatch_timeout_ms": j["dispatch_timeout_ms"], "retry": j["retry"]}, f"{what} (as an alarm)")


def schedule_ticks(j: dict, after: int, until: int) -> list[int]:
    """The ticks of j's schedule in (after, until]."""
    s = j["schedule"]
    if s.startswith("@every "):
        p, a = parse_every(s[len("@every "):].strip()), j["created_ms"]
        k = (after - a) // p + 1
        out = []
        while a + k * p <= until:
            out.append(a + k * p)
            k += 1
        return out
    out, at = [], after
    while True:
        batch = cron_ticks(s, j["tz"], j["dst_gap"], j["dst_fold"], at, 16)
        for t in batch:
            if t["utc_ms"] > until:
                return out
            out.append(t["utc_ms"])
        at = batch[-1]["utc_ms"]


def plan(j: dict, last, now: int, horizon: int):
    start = last if last is not None else j["created_ms"]
    cut = max(0, now - j["missed_grace_ms"])
    fire, dropped = [], 0
    if start < cut:
        if last is not None:
            missed = schedule_ticks(j, start, cut)
            k = {"skip": 0, "latest": 1, "all": j["missed_bound"]}[j["missed"]]
            fire = missed[len(missed) - k:] if k else []
            dropped = len(missed) - len(fire)
        start = cut
    upcoming = schedule_ticks(j, start, horizon)
    return fire + upcoming[:max(0, MAX_TICKS_A_ROUND - len(fire))], dropped


def tick_alarm(j: dict, tick: int, previous) -> dict:
    c = {"job": j["name"], "tick_ms": tick}
    if j["overlap"] == "skip" and previous is not None:
        c["after"] = f"cron-{j['name']}-{previous}"
    if j["strategy"] != "one":
        c["fan_out"] = j["strategy"]["all"]
    return {"id": f"cron-{j['name']}-{tick}", "due_ms": tick, "target": j["target"], "body": j["body"],
            "headers": j["headers"], "dispatch_timeout_ms": j["dispatch_timeout_ms"], "retry": j["retry"],
            "cron": c}


def check_cron_jobs(doc: dict) -> None:
    policies = set()
    for v in doc["cron_jobs"]:
        j = v["job"]
        what = f"cron job {j['name']!r}"
        check_job(j, what)
        if "request" in v:
            want = {**DEFAULTS, **v["request"]}
            check_eq(j, want, f"{what}: the request with every default filled in")
        if "stored" in v:
            members(v["stored"], {"v", "job", "at_ms"}, f"{what}: stored")
            check_eq((v["stored"]["v"], v["stored"]["job"]), (1, j), f"{what}: stored")
            members(v["tombstone"], {"v", "job", "at_ms"}, f"{what}: tombstone")
            check_eq((v["tombstone"]["v"], v["tombstone"]["job"]), (1, None), f"{what}: tombstone")
            members(v["planned"], {"tick_ms"}, f"{what}: crontick record")
        if "tick_alarm" in v:
            ta = v["tick_alarm"]
            check_alarm(ta, f"{what}: tick alarm")
            prev = ta["cron"].get("after")
            prev_ms = int(prev.rsplit("-", 1)[1]) if prev else None
            if j["overlap"] == "skip":
                check(prev is not None, f"{what}: overlap skip names the previous tick")
            got = tick_alarm(j, ta["cron"]["tick_ms"], prev_ms)
            check_eq(ta, got, f"{what}: tick alarm")
        for p in v.get("plans", []):
            jp = {**j, "missed": p["missed"]}
            ticks, dropped = plan(jp, p["last"], p["now"], p["horizon"])
            check_eq({"ticks": p["ticks"], "dropped": p["dropped"]}, {"ticks": ticks, "dropped": dropped},
                     f"{what}: plan under missed {p['missed']} (last {p['last']}, now {p['now']}, horizon {p['horizon']})")
            policies.add((p["missed"], p["last"] is None, j["schedule"].startswith("@every")))
    for pol in ("skip", "latest", "all"):
        check((pol, False, True) in policies and (pol, False, False) in policies,
              f"plans under missed {pol} for @every and for a cron expression")


# --- driver -------------------------------------------------------------------------

def check_all(doc: dict) -> dict:
    check_storage(doc)
    check_tick_ids(doc)
    check_lives(doc)
    check_dst(doc)
    check_cron_jobs(doc)
    return {
        "ids": len(doc["partitions"]),
        "records": sum(len(l["records"]) for l in doc["lives"]),
        "lives": len(doc["lives"]),
        "plans": sum(len(v.get("plans", [])) for v in doc["cron_jobs"]),
        "dst": sum(len(v["ticks"]) for v in doc["dst"]),
    }


def alterations(doc: dict):
    """Altered copies of the vectors, each of which must be refused."""
    def alt(what, f):
        d = copy.deepcopy(doc)
        f(d)
        return what, d

    def rec(d, life, i):
        return d["lives"][life]["records"][i]["record"]

    yield alt("a partition off by one", lambda d: d["partitions"][0].__setitem__("partition", (d["partitions"][0]["partition"] + 1) % 32))
    yield alt("the 128-character id's partition", lambda d: d["partitions"][-2].__setitem__("partition", (d["partitions"][-2]["partition"] + 7) % 32))
    yield alt("a bucket", lambda d: d["buckets"][3].__setitem__("bucket", 0))
    yield alt("a due subject with partition and bucket swapped", lambda d: d["due_index"][1].__setitem__(
        "due_subject", f"ts.alarms.due.{d['due_index'][1]['bucket']}.{d['due_index'][1]['partition']}.{d['due_index'][1]['id']}"))
    yield alt("a due entry's at_ms", lambda d: d["due_index"][0]["entry"].__setitem__("at_ms", 1))
    yield alt("a due entry with an unknown member", lambda d: d["due_index"][0]["entry"].__setitem__("x", 1))
    yield alt("a crontick subject", lambda d: d["cron_subjects"][0].__setitem__("tick_subject", "ts.alarms.crontick.0.backup"))
    yield alt("a tick id", lambda d: d["tick_ids"][0].__setitem__("tick_id", "backup-1772953200001"))
    yield alt("a negative tick's alarm id", lambda d: d["tick_ids"][4].__setitem__("alarm_id", "cron-old--1000"))
    yield alt("a leading-zero tick id read as valid", lambda d: d["tick_id_parse"][6].__setitem__("parsed", {"job": "backup", "tick_ms": 1}))
    yield alt("an overflowing tick id read as valid", lambda d: d["tick_id_parse"][-1].__setitem__("parsed", {"job": "a", "tick_ms": 99999999999999999999}))
    yield alt("a backoff past 40 doublings", lambda d: d["backoff"][2]["delays"][4].__setitem__("delay_ms", 2**41))
    yield alt("a backoff beyond its bound", lambda d: d["backoff"][1]["delays"][2].__setitem__("delay_ms", 4000))
    yield alt("a set record with its own set_seq", lambda d: rec(d, 0, 0).__setitem__("set_seq", 101))
    yield alt("a set record pending from a past due time", lambda d: rec(d, 3, 0)["status"].__setitem__("next_ms", rec(d, 3, 0)["alarm"]["due_ms"]))
    yield alt("a claim counting attempts from 0", lambda d: (rec(d, 0, 3)["status"].__setitem__("attempt", 1), rec(d, 0, 3)["event"].__setitem__("attempt", 1)))
    yield alt("a failure without its backoff", lambda d: rec(d, 0, 2)["status"].__setitem__("next_ms", rec(d, 0, 2)["event"]["at_ms"]))
    yield alt("a lateness from the answer, not the claim", lambda d: rec(d, 0, 4)["event"].__setitem__("lateness_ms", rec(d, 0, 4)["event"]["lateness_ms"] + 11))
    yield alt("a taken-over claim as a new attempt", lambda d: (rec(d, 1, 2)["status"].__setitem__("attempt", 2), rec(d, 1, 2)["event"].__setitem__("attempt", 2)))
    yield alt("a failure where the last attempt dead-letters", lambda d: rec(d, 1, 5).update(
        event={"event": "failed", "attempt": 2, "at_ms": rec(d, 1, 5)["event"]["at_ms"], "reason": "error: disk full"},
        status={"status": "pending", "next_ms": rec(d, 1, 5)["event"]["at_ms"] + 500, "attempts": 2}))
    yield alt("a dead-letter reason without its attempt", lambda d: rec(d, 1, 5)["event"].__setitem__("reason", "error: disk full"))
    yield alt("a retry_asked keeping the old due time", lambda d: rec(d, 2, 2)["alarm"].__setitem__("due_ms", rec(d, 2, 1)["alarm"]["due_ms"]))
    yield alt("a firing id unchanged by retry_asked", lambda d: d["lives"][2]["records"][2].__setitem__("firing_id", d["lives"][2]["records"][1]["firing_id"]))
    yield alt("a firing id without its tag", lambda d: d["lives"][0]["records"][1].__setitem__("firing_id", d["lives"][0]["records"][1]["firing_id"].rsplit("-", 1)[0]))
    yield alt("a firing id tagged under another key", lambda d: d.__setitem__("firing_key_hex", "ff" * 32))
    yield alt("a firing id with the wrong set_seq", lambda d: d["lives"][3]["records"][2].__setitem__("firing_id", d["lives"][3]["records"][0]["firing_id"]))
    yield alt("a record whose alarm changed outside set/retry", lambda d: rec(d, 0, 1)["alarm"].__setitem__("body", ""))
    yield alt("a done alarm cancelled", lambda d: d["lives"][0]["records"].append(
        {**copy.deepcopy(d["lives"][0]["records"][4]), "seq": 999, "final": True, "next_action_ms": None,
         "record": {**rec(d, 0, 4), "status": {"status": "cancelled", "at_ms": 1}, "event": {"event": "cancelled", "at_ms": 1}}}))
    yield alt("a status with an unknown member", lambda d: rec(d, 0, 1)["status"].__setitem__("extra", 1))
    yield alt("an event missing a member", lambda d: rec(d, 0, 4)["event"].pop("duplicate"))
    yield alt("a record version 2", lambda d: rec(d, 0, 0).__setitem__("v", 2))
    yield alt("a body that is not base64", lambda d: rec(d, 0, 0)["alarm"].__setitem__("body", "not base64!"))
    yield alt("a next action without the grace", lambda d: d["lives"][0]["records"][1].__setitem__("next_action_ms", rec(d, 0, 1)["status"]["since_ms"] + 5000))
    yield alt("a final record with a next action", lambda d: d["lives"][0]["records"][4].__setitem__("final", False))
    yield alt("a tick alarm without its after", lambda d: d["cron_jobs"][0]["tick_alarm"]["cron"].pop("after"))
    yield alt("a tick alarm without its fan_out", lambda d: d["lives"][5]["records"][0]["record"]["alarm"]["cron"].pop("fan_out"))
    yield alt("a default left out", lambda d: d["cron_jobs"][2]["job"].__setitem__("missed_bound", 5))
    yield alt("a plan firing every missed tick under latest", lambda d: d["cron_jobs"][0]["plans"][5]["ticks"].insert(0, d["cron_jobs"][0]["plans"][5]["ticks"][0] - 900_000))
    yield alt("a plan firing the oldest missed ticks under all", lambda d: d["cron_jobs"][0]["plans"][10]["ticks"].__setitem__(0, d["cron_jobs"][0]["plans"][10]["ticks"][0] - 900_000))
    yield alt("a plan counting the dropped ticks wrong", lambda d: d["cron_jobs"][0]["plans"][0].__setitem__("dropped", 6))
    yield alt("a new job's plan firing missed ticks", lambda d: d["cron_jobs"][0]["plans"][6]["ticks"].insert(0, d["cron_jobs"][0]["plans"][6]["ticks"][0] - 900_000))
    yield alt("a daily plan with the gap's tick at the unshifted wall time", lambda d: d["cron_jobs"][1]["plans"][4]["ticks"].__setitem__(0, d["cron_jobs"][1]["plans"][4]["ticks"][0] + 1_800_000))
    yield alt("a shifted tick at the wall time", lambda d: d["dst"][0]["ticks"][1].__setitem__("utc_ms", d["dst"][0]["ticks"][1]["utc_ms"] + 1_800_000))
    yield alt("a gap tick fired under skip", lambda d: d["dst"][1]["ticks"].insert(1, copy.deepcopy(d["dst"][0]["ticks"][1])))
    yield alt("an absorbed tick kept as shifted", lambda d: d["dst"][2]["ticks"][1].__setitem__("kind", "shifted"))
    yield alt("a fold fired twice under once", lambda d: d["dst"][4]["ticks"].__setitem__(2, copy.deepcopy(d["dst"][5]["ticks"][2])))
    yield alt("a repeated tick marked exact", lambda d: d["dst"][5]["ticks"][2].__setitem__("kind", "exact"))
    yield alt("a tick's offset", lambda d: d["dst"][10]["ticks"][3].__setitem__("offset_seconds", 39600))


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print(f"usage: {argv[0]} [alarm-vectors.json]", file=sys.stderr)
        return 2
    path = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "alarm-vectors.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"cannot read {path}: {e}", file=sys.stderr)
        return 2
    try:
        info = check_all(doc)
    except CheckFailed as e:
        print(f"FAIL: {e}", file=sys.stderr)
        print(f"({len(CHECKS)} checks passed before the failure)", file=sys.stderr)
        return 1
    except (KeyError, TypeError, IndexError, ValueError) as e:
        print(f"FAIL: vectors file malformed or unexpected shape: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    passed = len(CHECKS)
    negatives = 0
    for what, altered in alterations(doc):
        CHECKS.clear()
        try:
            check_all(altered)
        except (CheckFailed, KeyError, TypeError, IndexError, ValueError) as e:
            negatives += 1
            if VERBOSE:
                print(f"  rejected as expected: {what}: {str(e).splitlines()[0]}")
            continue
        print(f"FAIL: an altered copy of the vectors passed: {what}", file=sys.stderr)
        return 1
    print(f"OK: {path}: {passed} checks ({info['ids']} partitions, {info['lives']} lives of "
          f"{info['records']} records, {info['plans']} plans, {info['dst']} DST ticks), "
          f"{negatives} altered copies refused")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
