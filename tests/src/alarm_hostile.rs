//! The alarm-loader attacked as a hostile client would: its cron requests as raw
//! protocol bytes (garbage, wrong types, oversized bodies, headers that do not parse,
//! non-UTF-8 subjects and replies, replies aimed into our own space) mixed with good
//! requests; forged and replayed records in its stream; a loader stalled (SIGSTOP)
//! in the middle of a burst while another takes its partitions over.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use harness::Role;
use protocol::ProcessId;
use scheduler::Config;

use crate::alarms::{now_ms, set, spawn_loader, wait_for_loaders, wait_status};
use crate::raw::{publish, RawClient};
use crate::support::{connect, connect_as, read_log, server, test_key, InProcess};

/// One bad request: subject, reply (none: an inbox of the test), header block, body,
/// and the `Ts-Error` the answer must carry (none: no answer may come).
struct Bad {
    what: &'static str,
    subject: &'static [u8],
    reply: Option<&'static [u8]>,
    header: Option<&'static [u8]>,
    body: Vec<u8>,
    expect: Option<&'static str>,
    /// What the refusal's message must name (the field at fault).
    names: Option<&'static str>,
}

impl Bad {
    /// The refusal's message must name `field`.
    fn naming(self, field: &'static str) -> Bad {
        Bad {
            names: Some(field),
            ..self
        }
    }
}

fn bad(
    what: &'static str,
    subject: &'static [u8],
    body: impl Into<Vec<u8>>,
    expect: &'static str,
) -> Bad {
    Bad {
        what,
        subject,
        reply: None,
        header: None,
        body: body.into(),
        expect: Some(expect),
        names: None,
    }
}

/// A valid `cron add` body for job `name` (a yearly tick: nothing fires in a test).
fn job(name: &str) -> Vec<u8> {
    json!({"name": name, "schedule": "0 0 0 1 1 *", "target": {"process": "p"}})
        .to_string()
        .into_bytes()
}

/// A `cron add` body for job `name` with `field` set to `value`.
fn job_with(name: &str, field: &str, value: Value) -> Vec<u8> {
    let mut j: Value = serde_json::from_slice(&job(name)).unwrap_or_default();
    j[field] = value;
    j.to_string().into_bytes()
}

/// Every hostile cron request. Each valid-looking body names a job that must never
/// exist (`bad-…`): the test then knows nothing of it was stored.
fn cron_cases() -> Vec<Bad> {
    let huge_zone = "A".repeat(300 * 1024);
    vec![
        // Bodies.
        bad(
            "garbage",
            b"ts.cron.add",
            &b"\x00\xff\xfegarbage"[..],
            "malformed",
        ),
        bad("empty add", b"ts.cron.add", Vec::new(), "malformed"),
        bad("not json", b"ts.cron.add", &b"not json"[..], "malformed"),
        bad("an array", b"ts.cron.add", &b"[1,2]"[..], "malformed").naming("object"),
        bad(
            "name a number",
            b"ts.cron.add",
            job_with("bad-1", "name", json!(1)),
            "malformed",
        )
        .naming("name"),
        bad(
            "schedule a number",
            b"ts.cron.add",
            job_with("bad-2", "schedule", json!(5)),
            "malformed",
        )
        .naming("schedule"),
        bad(
            "active a string",
            b"ts.cron.add",
            job_with("bad-3", "active", json!("yes")),
            "malformed",
        )
        .naming("active"),
        bad(
            "second 61",
            b"ts.cron.add",
            job_with("bad-4", "schedule", json!("61 * * * * *")),
            "invalid_alarm",
        )
        .naming("schedule"),
        bad(
            "30 February",
            b"ts.cron.add",
            job_with("bad-5", "schedule", json!("0 0 0 30 2 *")),
            "invalid_alarm",
        )
        .naming("schedule"),
        bad(
            "unknown alias",
            b"ts.cron.add",
            job_with("bad-6", "schedule", json!("@fortnightly")),
            "invalid_alarm",
        )
        .naming("schedule"),
        bad(
            "unknown zone",
            b"ts.cron.add",
            job_with("bad-7", "tz", json!("Mars/Olympus_Mons")),
            "invalid_alarm",
        )
        .naming("tz"),
        bad(
            "a 300 KiB zone",
            b"ts.cron.add",
            job_with("bad-8", "tz", json!(huge_zone)),
            "invalid_alarm",
        )
        .naming("tz"),
        bad(
            "unknown missed policy",
            b"ts.cron.add",
            job_with("bad-9", "missed", json!("sometimes")),
            "invalid_alarm",
        )
        .naming("missed"),
        bad(
            "missed_bound 0",
            b"ts.cron.add",
            job_with("bad-10", "missed_bound", json!(0)),
            "invalid_alarm",
        )
        .naming("missed_bound"),
        bad(
            "unknown target kind",
            b"ts.cron.add",
            job_with("bad-11", "target", json!({"queue": "p"})),
            "malformed",
        )
        .naming("target"),
        bad(
            "target in the log",
            b"ts.cron.add",
            job_with("bad-12", "target", json!({"subject": "ts.log.p"})),
            "invalid_alarm",
        )
        .naming("target"),
        bad(
            "target in a bucket",
            b"ts.cron.add",
            job_with(
                "bad-13",
                "target",
                json!({"subject": "$KV.TS_OWNERSHIP.alarm-loader.p.0"}),
            ),
            "invalid_alarm",
        )
        .naming("target"),
        bad(
            "a control header",
            b"ts.cron.add",
            job_with("bad-14", "headers", json!([["Nats-Msg-Id", "x"]])),
            "invalid_alarm",
        )
        .naming("header"),
        bad(
            "unknown field",
            b"ts.cron.add",
            job_with("bad-15", "evil", json!(1)),
            "malformed",
        )
        .naming("evil"),
        bad(
            "a dot in the name",
            b"ts.cron.add",
            job("bad.16"),
            "invalid_alarm",
        )
        .naming("name"),
        bad(
            "a name ending in -",
            b"ts.cron.add",
            job("bad-17-"),
            "invalid_alarm",
        )
        .naming("name"),
        bad(
            "oversized body",
            b"ts.cron.add",
            job_with("bad-18", "body", json!("A".repeat(600 * 1024))),
            "too_large",
        ),
        bad(
            "delete without a name",
            b"ts.cron.delete",
            &b"{}"[..],
            "malformed",
        )
        .naming("name"),
        bad(
            "delete nothing",
            b"ts.cron.delete",
            &br#"{"name":"nope"}"#[..],
            "not_found",
        ),
        bad(
            "activate a b",
            b"ts.cron.activate",
            &br#"{"name":"a b"}"#[..],
            "invalid_alarm",
        )
        .naming("name"),
        bad(
            "deactivate an array",
            b"ts.cron.deactivate",
            &b"[]"[..],
            "malformed",
        ),
        // A struct read by position from an array would delete the job good-0.
        bad(
            "delete by position",
            b"ts.cron.delete",
            &br#"["good-0"]"#[..],
            "malformed",
        )
        .naming("object"),
        bad(
            "get nothing",
            b"ts.cron.get",
            &br#"{"name":"nope"}"#[..],
            "not_found",
        ),
        bad(
            "get with a stray field",
            b"ts.cron.get",
            &br#"{"name":"x","also":1}"#[..],
            "malformed",
        )
        .naming("also"),
        bad("get garbage", b"ts.cron.get", &b"\xc3\x28"[..], "malformed"),
        bad(
            "list garbage",
            b"ts.cron.list",
            &b"\x01\x02"[..],
            "malformed",
        ),
        bad("list an array", b"ts.cron.list", &b"[1]"[..], "malformed"),
        bad(
            "unknown operation",
            b"ts.cron.drop",
            &br#"{"name":"x"}"#[..],
            "malformed",
        ),
        // What the client library cannot parse: a valid body behind a bad header block
        // or subject must not be acted upon.
        Bad {
            header: Some(b"NATS/1.0\r\nno colon here\r\n\r\n"),
            ..bad(
                "a header line without a colon",
                b"ts.cron.add",
                job("bad-h1"),
                "malformed_request",
            )
        },
        Bad {
            header: Some(b"NATS/1.0\r\nX: a\rb\r\n\r\n"),
            ..bad(
                "a lone CR in a header value",
                b"ts.cron.add",
                job("bad-h2"),
                "malformed_request",
            )
        },
        Bad {
            header: Some(b"NATS/2.0\r\nX: y\r\n\r\n"),
            ..bad(
                "version NATS/2.0",
                b"ts.cron.add",
                job("bad-h3"),
                "malformed_request",
            )
        },
        Bad {
            header: Some(b"NATS/1.0\r\nX: \xff\xfe\r\n\r\n"),
            ..bad(
                "a non-UTF-8 header value",
                b"ts.cron.add",
                job("bad-h4"),
                "malformed_request",
            )
        },
        Bad {
            header: Some(b"NATS/1.0\r\nA B: y\r\n\r\n"),
            ..bad(
                "a space in a header name",
                b"ts.cron.delete",
                &br#"{"name":"good-0"}"#[..],
                "malformed_request",
            )
        },
        bad(
            "a non-UTF-8 subject",
            b"ts.cron.\xff",
            job("bad-s1"),
            "malformed_request",
        ),
        bad(
            "a non-UTF-8 operation",
            b"ts.cron.add\xc3",
            job("bad-s2"),
            "malformed_request",
        ),
        // No answer possible: a reply subject that is not UTF-8.
        Bad {
            reply: Some(b"_INBOX.bad.\xff"),
            expect: None,
            ..bad("a non-UTF-8 reply", b"ts.cron.add", job("bad-r0"), "")
        },
        // Replies aimed into our own space: dropped, never acted upon.
        Bad {
            reply: Some(b"ts.schedule.x"),
            expect: None,
            ..bad("reply into a process", b"ts.cron.add", job("bad-r1"), "")
        },
        Bad {
            reply: Some(b"ts.alarms.rec.evil"),
            expect: None,
            ..bad(
                "reply into the alarm stream",
                b"ts.cron.add",
                job("bad-r2"),
                "",
            )
        },
        Bad {
            reply: Some(b"$KV.TS_OWNERSHIP.alarm-loader.p.0"),
            expect: None,
            ..bad("reply into the leases", b"ts.cron.add", job("bad-r3"), "")
        },
        Bad {
            reply: Some(b"$JS.API.STREAM.PURGE.TS_ALARMS"),
            expect: None,
            ..bad(
                "reply into the JetStream API",
                b"ts.cron.delete",
                &br#"{"name":"good-0"}"#[..],
                "",
            )
        },
        Bad {
            reply: Some(b"$SRV.PING"),
            expect: None,
            ..bad(
                "reply into the services API",
                b"ts.cron.list",
                Vec::new(),
                "",
            )
        },
        Bad {
            reply: Some(b"ts.cron.add"),
            expect: None,
            ..bad(
                "reply into our own requests",
                b"ts.cron.add",
                job("bad-r4"),
                "",
            )
        },
        Bad {
            reply: Some(b"$KV.TS_OWNERSHIP.alarm-loader.m.x"),
            expect: None,
            ..bad(
                "services API answer into the leases",
                b"$SRV.STATS",
                Vec::new(),
                "",
            )
        },
    ]
}

/// The loader's STATS (one loader).
async fn stats(client: &async_nats::Client) -> Result<Value> {
    let m = tokio::time::timeout(
        Duration::from_secs(10),
        client.request("$SRV.STATS.turnstile-alarm-loader", Bytes::new()),
    )
    .await
    .context("STATS timed out")??;
    Ok(serde_json::from_slice(&m.payload)?)
}

/// One cron request through the client library; the JSON answer or the `Ts-Error`.
async fn cron(client: &async_nats::Client, op: &str, body: Value) -> Result<Result<Value, String>> {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(format!("ts.cron.{op}"), serde_json::to_vec(&body)?.into()),
    )
    .await
    .context("cron request timed out")??;
    if let Some(code) = reply.headers.as_ref().and_then(|h| h.get("Ts-Error")) {
        return Ok(Err(code.to_string()));
    }
    Ok(Ok(serde_json::from_slice(&reply.payload)?))
}

/// Hostile cron requests as raw protocol bytes, five rounds of every case, each round
/// followed by good requests on the same raw connection, while a well-behaved client
/// sets and reads alarms: every bad request with a usable reply gets its typed error,
/// the others no answer anywhere; none of them stores anything; every good request is
/// answered; the loader never loses a connection, and its STATS count what it refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_cron_requests_as_raw_bytes_get_typed_errors_and_store_nothing() -> Result<()> {
    let server = server()?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    // Where answers aimed into our space would land if they were sent: the scheduler's
    // requests (nobody else schedules in this test) and the alarm stream.
    let intake = connect_as(&server, Role::SchedulerIntake).await?;
    let mut into_processes = intake.subscribe("ts.schedule.>").await?;
    intake.flush().await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let mut into_alarms = operator.subscribe("ts.alarms.rec.>").await?;
    let leases = async_nats::jetstream::new(operator.clone())
        .get_key_value("TS_OWNERSHIP")
        .await?;
    let lease_before = leases.entry("alarm-loader.p.0").await?.map(|e| e.revision);
    operator.flush().await?;

    // A well-behaved client at the same time.
    let good_client = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                let id = format!("good-alarm-{i}");
                set(
                    &client,
                    json!({"id": id, "due_ms": now_ms() + 3_600_000, "target": {"process": "p"}}),
                )
                .await?;
                let got = crate::alarms::alarm(&client, "get", json!({"id": id})).await?;
                anyhow::ensure!(got.is_ok(), "get {id}: {got:?}");
            }
            anyhow::Ok(())
        })
    };

    let cases = cron_cases();
    let mut raw = RawClient::connect(server.url()).await?;
    raw.subscribe("_INBOX.bad.>", 1).await?;
    raw.subscribe("_INBOX.good.>", 2).await?;
    raw.flush().await?;
    let rounds = 5;
    let mut expected: BTreeMap<String, (String, &str)> = BTreeMap::new();
    let mut naming: BTreeMap<String, &str> = BTreeMap::new();
    let mut answers = Vec::new();
    for round in 0..rounds {
        for (i, case) in cases.iter().enumerate() {
            let inbox = format!("_INBOX.bad.{round}.{i}");
            let reply = case.reply.unwrap_or(inbox.as_bytes());
            raw.send(&publish(case.subject, Some(reply), case.header, &case.body))
                .await?;
            if let (Some(code), None) = (case.expect, case.reply) {
                if let Some(field) = case.names {
                    naming.insert(inbox.clone(), field);
                }
                expected.insert(inbox, (code.to_string(), case.what));
            }
        }
        // Good requests right behind the bad ones, on the same connection.
        let name = format!("good-{round}");
        raw.send(&publish(
            b"ts.cron.add",
            Some(format!("_INBOX.good.add.{round}").as_bytes()),
            None,
            &job(&name),
        ))
        .await?;
        raw.send(&publish(
            b"ts.cron.list",
            Some(format!("_INBOX.good.list.{round}").as_bytes()),
            None,
            b"",
        ))
        .await?;
        answers.extend(raw.flush().await?);
    }
    let wanted = expected.len() + 2 * rounds;
    let missing = wanted.saturating_sub(answers.len());
    answers.extend(raw.collect(missing, Duration::from_secs(30)).await?);

    let mut got: BTreeMap<String, (String, &str)> = BTreeMap::new();
    let mut good = BTreeMap::new();
    for m in &answers {
        let subject = String::from_utf8_lossy(&m.subject).to_string();
        if subject.starts_with("_INBOX.good.") {
            good.insert(subject, m.clone());
            continue;
        }
        let what = expected.get(&subject).map_or("unexpected", |(_, w)| w);
        // A typed error names what is wrong, in a bounded message.
        let message = m.header("Nats-Service-Error").unwrap_or_default();
        assert!(
            message.len() <= 1024,
            "{what}: a {} byte message",
            message.len()
        );
        if let Some(field) = naming.get(&subject) {
            assert!(
                message.contains(field),
                "{what}: {message:?} does not name {field}"
            );
        }
        got.insert(subject, (m.header("Ts-Error").unwrap_or_default(), what));
    }
    assert_eq!(
        got, expected,
        "every bad request with a usable reply gets its typed error, at once"
    );
    for round in 0..rounds {
        let add = good
            .get(&format!("_INBOX.good.add.{round}"))
            .with_context(|| format!("good add {round} unanswered"))?;
        assert_eq!(add.header("Ts-Error"), None, "good add {round}");
        let add: Value = serde_json::from_slice(&add.payload)?;
        assert_eq!(add["name"], format!("good-{round}"), "{add}");
        let list = good
            .get(&format!("_INBOX.good.list.{round}"))
            .with_context(|| format!("good list {round} unanswered"))?;
        let list: Value = serde_json::from_slice(&list.payload)?;
        assert!(list["jobs"].is_array(), "{list}");
    }
    good_client.await??;

    // Nothing of the bad requests was stored: exactly the good jobs exist.
    let list = cron(&client, "list", json!({}))
        .await?
        .map_err(anyhow::Error::msg)?;
    let names: BTreeSet<&str> = list["jobs"]
        .as_array()
        .context("jobs")?
        .iter()
        .filter_map(|j| j["name"].as_str())
        .collect();
    let good_names: Vec<String> = (0..rounds).map(|r| format!("good-{r}")).collect();
    assert_eq!(
        names,
        good_names.iter().map(String::as_str).collect(),
        "only the good jobs were stored"
    );
    // No answer landed where a hostile reply pointed.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), into_processes.next())
            .await
            .is_err(),
        "an answer reached the scheduler's requests"
    );
    while let Ok(Some(m)) =
        tokio::time::timeout(Duration::from_millis(300), into_alarms.next()).await
    {
        assert!(
            !m.subject.as_str().ends_with(".evil"),
            "an answer reached the alarm stream"
        );
    }
    assert_eq!(
        leases
            .entry("alarm-loader.p.0")
            .await?
            .map(|e| e.revision)
            .is_some(),
        lease_before.is_some(),
        "the lease of partition 0 is as it was"
    );

    // The loader counted what it refused and never lost a connection.
    let s = stats(&client).await?;
    let per_round = |f: fn(&Bad) -> bool| (cases.iter().filter(|c| f(c)).count() * rounds) as u64;
    let refused = per_round(|c| {
        c.expect.is_none() && c.reply.is_some_and(|r| std::str::from_utf8(r).is_ok())
    });
    let malformed = per_round(|c| {
        c.expect == Some("malformed_request")
            || c.reply.is_some_and(|r| std::str::from_utf8(r).is_err())
    });
    assert_eq!(s["replies_refused"], refused, "{s}");
    assert_eq!(s["malformed_requests"], malformed, "{s}");
    assert_eq!(s["connects"], 1, "the intake reconnected: {s}");
    for c in ["core", "intake"] {
        assert_eq!(s["connections"][c]["disconnects"], 0, "{c}: {s}");
        assert_eq!(s["connections"][c]["slow_consumer_drops"], 0, "{c}: {s}");
    }
    let cron_errors = s["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "cron")
        .and_then(|e| e["num_errors"].as_u64())
        .context("the cron endpoint's STATS")?;
    // Every typed refusal is an error of the endpoint, the unanswerable ones too.
    let unanswerable = per_round(|c| c.reply.is_some_and(|r| std::str::from_utf8(r).is_err()));
    assert_eq!(cron_errors, expected.len() as u64 + unanswerable, "{s}");
    assert!(loader.exited().is_none(), "the loader died");
    loader.terminate(Duration::from_secs(10));
    Ok(())
}

/// How many times each body is in `process`'s log.
async fn bodies(url: &str, process: &str) -> Result<HashMap<String, usize>> {
    let mut out = HashMap::new();
    for e in read_log(url, &ProcessId::new(process)?).await? {
        *out.entry(String::from_utf8_lossy(&e.body).into_owned())
            .or_default() += 1;
    }
    Ok(out)
}

/// A process-target alarm whose body is its id.
fn alarm_body(id: &str, due_ms: u64, process: &str) -> Value {
    use base64::Engine as _;
    json!({
        "id": id, "due_ms": due_ms, "target": {"process": process},
        "body": base64::engine::general_purpose::STANDARD.encode(id),
        "dispatch_timeout_ms": 2_000,
    })
}

/// The stored message at `seq` of the alarm stream, as `STREAM.MSG.GET` gives it: its
/// header block and its body.
async fn stored(nats: &async_nats::Client, seq: u64) -> Result<(Vec<u8>, Vec<u8>)> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let v = msg_get(nats, json!({ "seq": seq })).await?;
    let hdrs = v["message"]["hdrs"].as_str().unwrap_or_default();
    let data = v["message"]["data"].as_str().unwrap_or_default();
    Ok((b64.decode(hdrs)?, b64.decode(data)?))
}

/// The stream sequence of the last message on `subject`, if any (read raw: the
/// message may have headers no client library parses).
async fn last_seq(nats: &async_nats::Client, subject: &str) -> Result<Option<u64>> {
    let v = msg_get(nats, json!({ "last_by_subj": subject })).await?;
    Ok(v["message"]["seq"].as_u64())
}

/// The alarm stream's `STREAM.MSG.GET` answer to `query`, as JSON (`message` is absent
/// when nothing matches).
async fn msg_get(nats: &async_nats::Client, query: Value) -> Result<Value> {
    let m = nats
        .request("$JS.API.STREAM.MSG.GET.TS_ALARMS", query.to_string().into())
        .await?;
    Ok(serde_json::from_slice(&m.payload)?)
}

/// Publishes `body` on `subject` as the next message there (the compare-and-set every
/// genuine writer uses): written in its place.
async fn in_place(
    js: &async_nats::jetstream::Context,
    nats: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
) -> Result<u64> {
    let last = last_seq(nats, subject).await?.unwrap_or(0);
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(body.into())
        .expected_last_subject_sequence(last);
    Ok(js
        .send_publish(subject.to_string(), publish)
        .await?
        .await?
        .sequence)
}

/// Forged and replayed records in the alarm stream, written as the operator (the only
/// user besides the loader's that may write there): a record that does not decode
/// (in its place, and with a header block no library parses), a record of another
/// alarm on an alarm's subject, a replay of a fired alarm's `set` record (body only;
/// the verbatim copy is refused by JetStream's own expectation), due-index entries for
/// alarms that do not exist (one written "in the future", one whose body names
/// another alarm than its subject). The loader skips every foreign message (the
/// alarm's state is its last genuine record), reports each (`get`'s `foreign`, STATS
/// `foreign_records`), fires each alarm exactly once, removes the stray entries, and
/// keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_records_are_skipped_reported_and_fire_nothing_twice() -> Result<()> {
    use alarm_loader::alarm::{bucket_of, partition_of};
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator.clone());
    let subjects = journal::subjects::Subjects::default();
    let p = "forged";

    // A replay: an alarm that fired, then its `set` record copied after its end.
    set(&client, alarm_body("replayed", now_ms() - 1_000, p)).await?;
    let done = wait_status(&client, "replayed", "done", 30).await?;
    let set_seq = done["history"][0]["seq"].as_u64().context("set seq")?;
    let (header, body) = stored(&operator, set_seq).await?;
    let rec = subjects.alarm_record("replayed");
    // Verbatim (its expectation header included): JetStream refuses it.
    let verbatim = async_nats::jetstream::message::PublishMessage::build()
        .payload(body.clone().into())
        .expected_last_subject_sequence(0);
    let refused = match js.send_publish(rec.clone(), verbatim).await {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a verbatim replay was stored");
    assert!(
        String::from_utf8_lossy(&header).contains("Nats-Expected-Last-Subject-Sequence"),
        "a record is stored with its expectation: {}",
        String::from_utf8_lossy(&header)
    );
    // The body alone is stored; with an entry that makes a loader look at it now.
    let replay_seq = js.publish(rec.clone(), body.into()).await?.await?.sequence;
    let now = now_ms();
    let due = |id: &str| subjects.alarm_due(partition_of(id), bucket_of(now), id);
    let entry = |id: &str, written_ms: u64| {
        json!({"id": id, "at_ms": now, "written_ms": written_ms})
            .to_string()
            .into_bytes()
    };
    js.publish(due("replayed"), entry("replayed", now).into())
        .await?
        .await?;

    // Three alarms due in a few seconds, each with something forged after its record.
    let due_at = now_ms() + 3_000;
    for id in ["bad-json", "bad-headers", "other-id"] {
        set(&client, alarm_body(id, due_at, p)).await?;
    }
    // Garbage in its place.
    let bad_json = in_place(
        &js,
        &operator,
        &subjects.alarm_record("bad-json"),
        b"{\"v\":1,\"alarm\":".to_vec(),
    )
    .await?;
    // Garbage behind a header block no client library parses (a lone CR).
    let mut raw = RawClient::connect(&server.url_as(Role::Operator)).await?;
    raw.send(&publish(
        subjects.alarm_record("bad-headers").as_bytes(),
        None,
        Some(b"NATS/1.0\r\nX: a\rb\r\n\r\n"),
        b"\xff\xfe",
    ))
    .await?;
    raw.flush().await?;
    let bad_headers = last_seq(&operator, &subjects.alarm_record("bad-headers"))
        .await?
        .context("the forged message")?;
    // A well-formed record of another alarm, due long ago, on other-id's subject.
    let mut other: Value = serde_json::from_slice(&stored(&operator, set_seq).await?.1)?;
    other["alarm"]["id"] = json!("elsewhere");
    other["alarm"]["body"] = json!("ZWxzZXdoZXJl"); // "elsewhere"
    let other_seq = in_place(
        &js,
        &operator,
        &subjects.alarm_record("other-id"),
        other.to_string().into_bytes(),
    )
    .await?;

    // Entries for alarms that do not exist.
    let ghost_future = due("ghost-future");
    js.publish(
        ghost_future.clone(),
        entry("ghost-future", now + 10 * 365 * 86_400_000).into(),
    )
    .await?
    .await?;
    let ghost_other = due("ghost-subject");
    js.publish(
        ghost_other.clone(),
        entry("ghost-body", now - 60_000).into(),
    )
    .await?
    .await?;

    // Each alarm fires once, from its last genuine record.
    for id in ["bad-json", "bad-headers", "other-id"] {
        let got = wait_status(&client, id, "done", 30).await?;
        assert_eq!(got["alarm"]["id"], id, "{got}");
    }
    let expect_foreign = [
        ("bad-json", bad_json),
        ("bad-headers", bad_headers),
        ("other-id", other_seq),
        ("replayed", replay_seq),
    ];
    for (id, seq) in expect_foreign {
        let got = crate::alarms::alarm(&client, "get", json!({"id": id}))
            .await?
            .map_err(anyhow::Error::msg)?;
        assert_eq!(got["status"]["status"], "done", "{id}: {got}");
        let foreign: Vec<u64> = got["foreign"]
            .as_array()
            .with_context(|| format!("{id}: no foreign list: {got}"))?
            .iter()
            .filter_map(|f| f["seq"].as_u64())
            .collect();
        assert_eq!(foreign, vec![seq], "{id}: {got}");
    }
    // The stray entries are removed (after the grace a young entry gets).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    for subject in [&ghost_future, &ghost_other, &due("replayed")] {
        while last_seq(&operator, subject).await?.is_some() {
            if tokio::time::Instant::now() > deadline {
                bail!("the stray entry {subject} is still there");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // Nothing fired twice, nothing forged fired at all.
    let b = bodies(server.url(), p).await?;
    for id in ["replayed", "bad-json", "bad-headers", "other-id"] {
        assert_eq!(b.get(id), Some(&1), "{id}: {b:?}");
    }
    assert_eq!(b.len(), 4, "{b:?}");
    assert!(
        last_seq(&operator, &subjects.alarm_record("elsewhere"))
            .await?
            .is_none(),
        "the loader wrote where a forged record pointed"
    );
    let s = stats(&client).await?;
    let data = &s["endpoints"][0]["data"];
    assert!(data["foreign_records"].as_u64() >= Some(4), "{s}");
    assert!(data["bad_entries"].as_u64() >= Some(1), "{s}");
    assert!(loader.exited().is_none(), "the loader died");
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// A loader stopped (SIGSTOP) in the middle of a burst of firings into one process,
/// kept stopped past its lease and its claims' dispatch timeout while the other loader
/// takes its partitions and its claims over, then continued (SIGCONT): it wakes with
/// claims, requests and outcomes in flight, yet every alarm is in the log exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_stopped_mid_burst_and_continued_after_a_takeover_fires_each_alarm_once(
) -> Result<()> {
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let client = connect(server.url()).await?;
    // A first, alone: its services-API id names it.
    let mut a = spawn_loader(&server)?;
    wait_for_loaders(&client, 1).await?;
    let ping: Value = serde_json::from_slice(
        &client
            .request("$SRV.PING.turnstile-alarm-loader", Bytes::new())
            .await?
            .payload,
    )?;
    let a_id = ping["id"].as_str().context("loader a's id")?.to_string();
    let mut b = spawn_loader(&server)?;
    wait_for_loaders(&client, 2).await?;
    crate::alarms::wait_for_partitions(&client, 2).await?;
    let p = "stalled";
    let n = 150;
    // Due just before a bucket of the due index ends, so the other loader takes the
    // stopped one's partitions over in the next bucket (where a catch-up that starts
    // at the present would miss them).
    let now = now_ms();
    let bucket_ms = alarm_loader::alarm::BUCKET_MS;
    let mut due = (now / bucket_ms + 1) * bucket_ms - 800;
    if due < now + 2_500 {
        due += bucket_ms;
    }
    for i in 0..n {
        let mut body = alarm_body(&format!("s{i}"), due + (i as u64 % 3) * 100, p);
        body["dispatch_timeout_ms"] = json!(1_000);
        set(&client, body).await?;
    }
    // Read from the stream itself: a request to the loaders' queue group may go to
    // the stopped one (its subscriptions live on until the server gives up on it).
    let store = crate::support::operator_store(&server).await?;
    // Stopped as soon as it is firing the burst (its first claim won).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = client
            .request(
                format!("$SRV.STATS.turnstile-alarm-loader.{a_id}"),
                Bytes::new(),
            )
            .await?;
        let v: Value = serde_json::from_slice(&m.payload)?;
        if v["endpoints"][0]["data"]["dispatched"].as_u64() > Some(0) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("loader a fired nothing within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = a.pid().context("loader a's pid")?;
    harness::send_signal(pid, "STOP")?;
    let stopped_at = now_ms();
    let result = async {
        // Every alarm is fired by the other loader (A's partitions after its lease, A's
        // claims after their dispatch timeout and the grace).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut left: BTreeSet<usize> = (0..n).collect();
        while !left.is_empty() {
            let mut still = BTreeSet::new();
            let mut statuses = BTreeMap::new();
            for &i in &left {
                let rec = store.read(&format!("s{i}")).await?;
                match rec.map(|(r, _)| r.status) {
                    Some(alarm_loader::alarm::Status::Done { .. }) => {}
                    other => {
                        still.insert(i);
                        statuses.insert(i, format!("{other:?}"));
                    }
                }
            }
            left = still;
            if !left.is_empty() && tokio::time::Instant::now() > deadline {
                bail!("not done within 60 s of the stop: {statuses:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Stopped past its lease and its claims' timeout whatever the machine's pace.
        let past = stopped_at + 4_000;
        tokio::time::sleep(Duration::from_millis(past.saturating_sub(now_ms()))).await;
        harness::send_signal(pid, "CONT")?;
        // It wakes, finishes what it had in flight, joins again and shares the work.
        wait_for_loaders(&client, 2).await?;
        crate::alarms::wait_for_partitions(&client, 2).await?;
        // A new alarm after the wake-up fires too (both loaders are working).
        set(&client, alarm_body("after", now_ms(), p)).await?;
        wait_status(&client, "after", "done", 30).await?;
        anyhow::Ok(())
    }
    .await;
    // Never leave a stopped process behind.
    let _ = harness::send_signal(pid, "CONT");
    result?;
    // How the stop fell: alarms claimed by more than one loader (taken over from the
    // stopped one, or claimed by it after it woke).
    let mut claimed_twice = 0;
    for i in 0..n {
        let (history, _) = store.history(&format!("s{i}"), 100).await?;
        let by: BTreeSet<String> = history
            .iter()
            .filter_map(|(r, _)| match &r.event {
                alarm_loader::alarm::Event::Attempt { by, .. } => Some(by.clone()),
                _ => None,
            })
            .collect();
        claimed_twice += usize::from(by.len() > 1);
    }
    eprintln!("{claimed_twice} of {n} alarms were claimed by both loaders");
    let log = bodies(server.url(), p).await?;
    for i in 0..n {
        assert_eq!(log.get(&format!("s{i}")), Some(&1), "s{i}: {log:?}");
    }
    assert_eq!(log.get("after"), Some(&1));
    assert_eq!(log.len(), n + 1, "{log:?}");
    assert!(
        a.exited().is_none() && b.exited().is_none(),
        "a loader died"
    );
    a.terminate(Duration::from_secs(10));
    b.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// The ticks of `job` in `process`'s log, in log order.
async fn ticks(url: &str, process: &str, job: &str) -> Result<Vec<String>> {
    let prefix = format!("alarm-cron-{job}-");
    Ok(read_log(url, &ProcessId::new(process)?)
        .await?
        .into_iter()
        .filter(|e| e.message_id.starts_with(&prefix))
        .map(|e| e.message_id)
        .collect())
}

/// Waits until `job` has at least `n` ticks in `process`'s log.
async fn wait_ticks(url: &str, process: &str, job: &str, n: usize) -> Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let t = ticks(url, process, job).await?;
        if t.len() >= n {
            return Ok(t);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{job}: {} ticks of {n} within 30 s", t.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Forged records of cron jobs, written as the operator: garbage in place of a job's
/// planning record (the job goes on ticking), garbage in place of a job's definition
/// (an add replaces it; the job ticks again), and a deleted job's old definition
/// replayed (body only) after its deletion (the job stays deleted: no tick fires, `get`
/// and `list` do not show it). Each is reported (STATS `foreign_records`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_cron_records_neither_stop_a_job_nor_bring_a_deleted_one_back() -> Result<()> {
    use alarm_loader::alarm::partition_of;
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator.clone());
    let subjects = journal::subjects::Subjects::default();
    let p = "ticked";
    let every =
        |name: &str| json!({"name": name, "schedule": "@every 1s", "target": {"process": p}});
    for name in ["planned", "garbled", "deleted"] {
        cron(&client, "add", every(name))
            .await?
            .map_err(anyhow::Error::msg)?;
    }
    for name in ["planned", "garbled", "deleted"] {
        wait_ticks(server.url(), p, name, 1).await?;
    }

    // Garbage in place of "planned"'s last planned tick: it goes on ticking.
    let tick_subject = subjects.cron_tick(partition_of("planned"), "planned");
    in_place(&js, &operator, &tick_subject, b"\x00garbage".to_vec()).await?;
    let before = ticks(server.url(), p, "planned").await?.len();

    // Garbage in place of "garbled"'s definition: an add replaces it, ticks go on.
    let job_subject = subjects.cron_job(partition_of("garbled"), "garbled");
    in_place(&js, &operator, &job_subject, b"{\"v\":1,\"job\":".to_vec()).await?;
    let replaced = cron(&client, "add", every("garbled")).await?;
    assert!(
        replaced.is_ok(),
        "a job over a foreign record: {replaced:?}"
    );
    let garbled = ticks(server.url(), p, "garbled").await?.len();

    // "deleted" is deleted; its old definition is replayed after the tombstone.
    let deleted_subject = subjects.cron_job(partition_of("deleted"), "deleted");
    let definition = last_seq(&operator, &deleted_subject)
        .await?
        .context("deleted's definition")?;
    let (_, old) = stored(&operator, definition).await?;
    cron(&client, "delete", json!({"name": "deleted"}))
        .await?
        .map_err(anyhow::Error::msg)?;
    js.publish(deleted_subject.clone(), old.into())
        .await?
        .await?;
    let deleted = ticks(server.url(), p, "deleted").await?.len();

    wait_ticks(server.url(), p, "planned", before + 3).await?;
    wait_ticks(server.url(), p, "garbled", garbled + 3).await?;
    // Long enough for a resurrected job to tick: its ticks are planned 600 ms ahead and
    // fire every second.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = ticks(server.url(), p, "deleted").await?;
    assert!(
        after.len() <= deleted + 1,
        "a deleted job ticks again after a replay: {} ticks, {deleted} at its deletion",
        after.len()
    );
    assert_eq!(
        cron(&client, "get", json!({"name": "deleted"})).await?,
        Err("not_found".to_string())
    );
    let list = cron(&client, "list", json!({}))
        .await?
        .map_err(anyhow::Error::msg)?;
    assert!(
        !list["jobs"]
            .as_array()
            .context("jobs")?
            .iter()
            .any(|j| j["name"] == "deleted"),
        "{list}"
    );
    let s = stats(&client).await?;
    assert!(
        s["endpoints"][0]["data"]["foreign_records"].as_u64() >= Some(2),
        "{s}"
    );
    assert!(loader.exited().is_none(), "the loader died");
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// A forged sweep checkpoint far ahead (a genuine one is always behind the present)
/// must not make a starting loader skip the alarms that fell due while no loader ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_sweep_checkpoint_ahead_of_time_hides_no_alarm() -> Result<()> {
    use alarm_loader::alarm::{bucket_of, partition_of, BUCKET_MS};
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let p = "swept";
    let due = now_ms() + 300;
    set(&client, alarm_body("during-outage", due, p)).await?;
    loader.terminate(Duration::from_secs(10));
    // Its partition's checkpoint "says" every bucket up to year 5138 is empty.
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator.clone());
    let subjects = journal::subjects::Subjects::default();
    js.publish(
        subjects.alarm_swept(partition_of("during-outage")),
        "99999999999".into(),
    )
    .await?
    .await?;
    // Restarted once the alarm's bucket is over: only a catch-up can find it.
    let next_bucket = (bucket_of(due) + 1) * BUCKET_MS;
    tokio::time::sleep(Duration::from_millis(
        (next_bucket + 100).saturating_sub(now_ms()),
    ))
    .await;
    let mut loader = spawn_loader(&server)?;
    wait_for_loaders(&client, 1).await?;
    wait_status(&client, "during-outage", "done", 30).await?;
    assert_eq!(
        bodies(server.url(), p).await?.get("during-outage"),
        Some(&1)
    );
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// A message on a due-index subject that is no entry is removed through its own
/// sequence: a genuine entry stored on the same subject after the load read the stray
/// one stays. (Unbounded, the removal took that entry too, and its alarm, outside the
/// loaded window, had nothing left to bring it in.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_stray_due_entry_keeps_a_genuine_entry_stored_after_it() -> Result<()> {
    use alarm_loader::alarm::{bucket_of, partition_of};
    let server = server()?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator.clone());
    let subjects = journal::subjects::Subjects::default();
    let store = alarm_loader::store::Store::open(
        js.clone(),
        subjects.clone(),
        &journal::setup::LogOptions::default(),
    )
    .await?;
    let (id, at) = ("kept", now_ms() + 3_600_000);
    let (p, b) = (partition_of(id), bucket_of(at));
    let subject = subjects.alarm_due(p, b, id);
    let bad_seq = js
        .publish(subject.clone(), Bytes::from_static(b"not an entry"))
        .await?
        .await?
        .sequence;
    // What a load meets: the stray message is the subject's last.
    let (entries, bad) = store.load_checked(&[p], b..=b).await?;
    assert!(entries.is_empty(), "{entries:?}");
    assert_eq!(bad, vec![(subject.clone(), bad_seq)]);
    // A genuine entry lands on the same subject before the removal.
    let entry = json!({"id": id, "at_ms": at, "written_ms": now_ms()}).to_string();
    let good_seq = js
        .publish(subject.clone(), entry.into())
        .await?
        .await?
        .sequence;
    store.remove_bad_entry(&subject, bad_seq).await?;
    assert_eq!(last_seq(&operator, &subject).await?, Some(good_seq));
    let (entries, bad) = store.load_checked(&[p], b..=b).await?;
    assert!(bad.is_empty(), "{bad:?}");
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, vec![id]);
    // And the stray message is gone.
    let v = msg_get(&operator, json!({ "seq": bad_seq })).await?;
    assert!(v["message"].is_null(), "still stored: {v}");
    Ok(())
}

/// A client allowed to schedule into an alarm's process writes there first under the
/// alarm's firing id. The id it can make from what it knows (`alarm-<id>-<set_seq>-
/// <due_ms>`: the set answer gives the sequence) is not the firing's: the firing id ends
/// in a tag made with the loaders' secret firing key, so the alarm fires with its own
/// body. And should the key leak, an entry written first under the real id still does
/// not pass for the firing: the scheduler answers the firing as a duplicate of the
/// client's entry, the loader finds another body in that receipt and fails the attempt
/// (retried, looked for in the log by id *and* content, then dead with the reason),
/// never `done` with the client's slot while the alarm's body never reached the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_written_first_under_a_firing_id_does_not_pass_for_the_firing() -> Result<()> {
    use journal::client::{Client, Schedule};
    let server = server()?;
    let _sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let scheduler = Client::new(client.clone(), journal::subjects::Subjects::default());
    let p = "taken-p";
    let write_first = |id: String| {
        let scheduler = scheduler.clone();
        async move {
            scheduler
                .schedule(
                    &ProcessId::new(p)?,
                    Bytes::from_static(b"forged"),
                    &Schedule {
                        message_id: Some(id),
                        ..Default::default()
                    },
                )
                .await
                .map_err(anyhow::Error::from)
        }
    };

    // What a client can make: taken first, it takes nothing.
    let due = now_ms() + 2_000;
    let answer = set(&client, alarm_body("guessed", due, p)).await?;
    let seq = answer["seq"].as_u64().context("set seq")?;
    write_first(format!("alarm-guessed-{seq}-{due}")).await?;
    let got = wait_status(&client, "guessed", "done", 30).await?;
    let slot = got["status"]["slot"].as_u64().context("slot")?;
    let log = read_log(server.url(), &ProcessId::new(p)?).await?;
    let fired = log
        .iter()
        .find(|e| e.slot == slot)
        .context("the firing's slot is in the log")?;
    assert_eq!(&fired.body[..], b"guessed", "{got}");

    // The real id, made with the key (as if it leaked; the operator reads it).
    let store = crate::support::operator_store(&server).await?;
    let due = now_ms() + 3_000;
    let mut body = alarm_body("taken", due, p);
    body["retry"] = json!({"attempts": 2, "backoff_ms": 200, "max_backoff_ms": 200});
    let answer = set(&client, body).await?;
    let seq = answer["seq"].as_u64().context("set seq")?;
    let tag = store.firing_key().tag("taken", seq, due);
    let forged = write_first(format!("alarm-taken-{seq}-{due}-{tag}")).await?;
    let got = wait_status(&client, "taken", "dead", 30).await?;
    let reason = got["status"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("taken in the log") && reason.contains(&format!("slot {}", forged.slot)),
        "{got}"
    );
    let events: Vec<&str> = got["history"]
        .as_array()
        .context("history")?
        .iter()
        .filter_map(|h| h["event"]["event"].as_str())
        .collect();
    assert!(!events.contains(&"delivered"), "{events:?}");
    assert_eq!(
        bodies(server.url(), p).await?,
        HashMap::from([("forged".to_string(), 2), ("guessed".to_string(), 1)]),
        "the log holds the guessed alarm's firing and the client's two messages"
    );
    let s = stats(&client).await?;
    assert!(
        s["endpoints"][0]["data"]["firing_ids_taken"].as_u64() >= Some(2),
        "{s}"
    );
    assert!(loader.exited().is_none(), "the loader died");
    loader.terminate(Duration::from_secs(10));
    Ok(())
}

/// The firing key is made once: loaders starting together on a fresh deployment all
/// read the one that won the write. A key message that is not 32 bytes is a
/// misconfiguration: the loader ends at once with one clear line and replaces nothing
/// (a new key would change the id of every firing under way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firing_key_is_made_once_and_a_damaged_one_stops_the_loader() -> Result<()> {
    let server = server()?;
    let stores =
        futures::future::try_join_all((0..4).map(|_| crate::support::operator_store(&server)))
            .await?;
    let tags: BTreeSet<String> = stores
        .iter()
        .map(|s| s.firing_key().tag("a", 1, 2))
        .collect();
    assert_eq!(tags.len(), 1, "four loaders, one key: {tags:?}");

    let damaged = crate::support::server()?;
    let js = async_nats::jetstream::new(connect_as(&damaged, Role::Operator).await?);
    let subjects = journal::subjects::Subjects::default();
    journal::setup::ensure_alarms(&js, &subjects, &journal::setup::LogOptions::default()).await?;
    let bad_seq = js
        .publish(subjects.alarm_firing_key(), Bytes::from_static(b"short"))
        .await?
        .await?
        .sequence;
    let (status, stderr) = crate::support::loader_that_ends(&damaged).await?;
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!status.success(), "{status}: {stderr}");
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("firing key") && lines[0].contains("5 bytes"),
        "{stderr}"
    );
    // Nothing replaced it.
    let stream = js.get_stream(subjects.alarms_stream()).await?;
    let last = stream
        .get_last_raw_message_by_subject(&subjects.alarm_firing_key())
        .await?;
    assert_eq!(last.sequence, bad_seq);

    // A good key with a second message written after it (an operator's "restore", a
    // mistake): no loader follows the later one, none starts.
    let doubled = crate::support::server()?;
    let first_key = crate::support::operator_store(&doubled)
        .await?
        .firing_key()
        .tag("a", 1, 2);
    let js = async_nats::jetstream::new(connect_as(&doubled, Role::Operator).await?);
    js.publish(subjects.alarm_firing_key(), Bytes::from(vec![7u8; 32]))
        .await?
        .await?;
    let reopened = alarm_loader::store::Store::open(
        js.clone(),
        subjects.clone(),
        &journal::setup::LogOptions::default(),
    )
    .await;
    match reopened {
        Ok(s) => panic!(
            "opened on a second key (its tag of a/1/2 {}, the first's {first_key})",
            s.firing_key().tag("a", 1, 2)
        ),
        Err(e) => assert!(e.to_string().contains("more than one message"), "{e}"),
    }
    let (status, stderr) = crate::support::loader_that_ends(&doubled).await?;
    assert!(!status.success(), "{status}: {stderr}");
    assert!(stderr.contains("more than one message"), "{stderr}");
    Ok(())
}
