//! The alarm-loader against a real nats-server and a real scheduler: alarms fire into
//! their process once, with their slot recorded; cancel, replace, past-due; loaders
//! racing and crashing; every loader down while alarms fall due; subject targets with
//! retry and dead letters; hostile requests as raw protocol bytes.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use harness::{NatsServer, Role};
use protocol::ProcessId;
use scheduler::Config;

use crate::support::{connect, connect_as, read_log, server, settled, test_key, InProcess};

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts the alarm-loader binary on `server` with its two identities, loading
/// every 300 ms.
pub(crate) fn spawn_loader(server: &NatsServer) -> Result<harness::Process> {
    let mut cmd = crate::support::loader_command(
        server,
        &["--in-memory-interval-ms", "300", "--lease-ms", "2000"],
    )?;
    cmd.env(
        "RUST_LOG",
        std::env::var("TS_TEST_LOADER_LOG").unwrap_or_else(|_| "warn".into()),
    );
    Ok(harness::Process::spawn(cmd)?)
}

/// Waits until `n` loaders answer PING.
pub(crate) async fn wait_for_loaders(client: &async_nats::Client, n: usize) -> Result<()> {
    crate::support::wait_for_service(client, "turnstile-alarm-loader", n).await
}

/// Waits until `n` loaders share the 32 partitions, each holding some (the group has
/// settled after they joined).
pub(crate) async fn wait_for_partitions(client: &async_nats::Client, n: usize) -> Result<()> {
    for _ in 0..300 {
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(inbox.clone()).await?;
        client
            .publish_with_reply("$SRV.STATS.turnstile-alarm-loader", inbox, Bytes::new())
            .await?;
        let mut held = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
            let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            if let Some(p) = v["endpoints"][0]["data"]["partitions"].as_u64() {
                held.push(p);
            }
        }
        if held.len() == n && held.iter().all(|&p| p > 0) && held.iter().sum::<u64>() == 32 {
            return Ok(());
        }
    }
    bail!("{n} alarm-loaders did not come to share the 32 partitions within 60 s")
}

/// One alarm request; the JSON answer, or the `Ts-Error` code.
pub(crate) async fn alarm(
    client: &async_nats::Client,
    op: &str,
    body: Value,
) -> Result<Result<Value, String>> {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(format!("ts.alarm.{op}"), serde_json::to_vec(&body)?.into()),
    )
    .await
    .context("alarm request timed out")??;
    if let Some(code) = reply.headers.as_ref().and_then(|h| h.get("Ts-Error")) {
        return Ok(Err(code.to_string()));
    }
    Ok(Ok(serde_json::from_slice(&reply.payload)?))
}

pub(crate) fn set_body(id: &str, due_ms: u64, process: &str, body: &str) -> Value {
    use base64::Engine as _;
    json!({
        "id": id,
        "due_ms": due_ms,
        "target": {"process": process},
        "body": base64::engine::general_purpose::STANDARD.encode(body),
    })
}

/// Sets an alarm that must be accepted; the loader's answer.
pub(crate) async fn set(client: &async_nats::Client, body: Value) -> Result<Value> {
    alarm(client, "set", body)
        .await?
        .map_err(anyhow::Error::msg)
}

/// Waits until alarm `id`'s status is `status` (at most `secs`); its `get` answer.
pub(crate) async fn wait_status(
    client: &async_nats::Client,
    id: &str,
    status: &str,
    secs: u64,
) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        // A request in flight to a loader that is killed is lost: ask again.
        let got = match alarm(client, "get", json!({"id": id})).await {
            Ok(got) => got,
            Err(e) => Err(e.to_string()),
        };
        if let Ok(v) = &got {
            if v["status"]["status"] == status {
                return Ok(v.clone());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("alarm {id} not {status} within {secs} s: {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many times each body is in `process`'s log.
async fn bodies(server: &NatsServer, process: &str) -> Result<HashMap<String, usize>> {
    let p = ProcessId::new(process)?;
    let mut out = HashMap::new();
    for e in read_log(server.url(), &p).await? {
        *out.entry(String::from_utf8_lossy(&e.body).into_owned())
            .or_default() += 1;
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_fires_into_its_process_once_and_records_its_slot() -> Result<()> {
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let due = now_ms() + 1_500;
    let set = alarm(&client, "set", set_body("a-1", due, "alarmed", "wake up")).await?;
    let set = set.map_err(|e| anyhow::anyhow!("set refused: {e}"))?;
    assert_eq!(set["replaced"], false);
    let got = wait_status(&client, "a-1", "done", 20).await?;
    let slot = got["status"]["slot"]
        .as_u64()
        .context("a done process alarm names its slot")?;
    let log = read_log(server.url(), &ProcessId::new("alarmed")?).await?;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].slot, slot);
    assert_eq!(&log[0].body[..], b"wake up");
    assert!(
        log[0].message_id.starts_with("alarm-a-1-"),
        "{}",
        log[0].message_id
    );
    // It fired on time (not before its due time) and its history says how.
    let events: Vec<&str> = got["history"]
        .as_array()
        .context("history")?
        .iter()
        .filter_map(|h| h["event"]["event"].as_str())
        .collect();
    assert_eq!(events, ["set", "attempt", "delivered"]);
    let delivered = &got["history"][2]["event"];
    assert!(delivered["lateness_ms"].as_i64() >= Some(0), "{delivered}");
    assert!(log[0].timestamp_ms >= due);
    // The loader reports it.
    let stats: Value = serde_json::from_slice(
        &client
            .request("$SRV.STATS.turnstile-alarm-loader", Bytes::new())
            .await?
            .payload,
    )?;
    let data = &stats["endpoints"][0]["data"];
    assert_eq!(data["delivered"], 1, "{stats}");
    assert_eq!(data["lateness_ms"]["samples"], 1, "{stats}");
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_due_fires_at_once_cancelled_never_replaced_at_its_new_time() -> Result<()> {
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let now = now_ms();
    set(&client, set_body("past", now - 60_000, "p", "past")).await?;
    set(
        &client,
        set_body("cancel-me", now + 2_000, "p", "cancelled"),
    )
    .await?;
    set(&client, set_body("moved", now + 60_000, "p", "moved")).await?;
    let replaced = set(&client, set_body("moved", now + 1_000, "p", "moved")).await?;
    assert_eq!(replaced["replaced"], true);
    let c = alarm(&client, "cancel", json!({"id": "cancel-me"}))
        .await?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(c["cancelled"], true);
    wait_status(&client, "past", "done", 10).await?;
    wait_status(&client, "moved", "done", 10).await?;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    wait_status(&client, "cancel-me", "cancelled", 1).await?;
    let b = bodies(&server, "p").await?;
    assert_eq!(b.get("past"), Some(&1));
    assert_eq!(b.get("moved"), Some(&1));
    assert_eq!(b.get("cancelled"), None, "{b:?}");
    // Unknown ids are refused by type.
    assert_eq!(
        alarm(&client, "get", json!({"id": "nope"})).await?,
        Err("not_found".into())
    );
    assert_eq!(
        alarm(&client, "cancel", json!({"id": "nope"})).await?,
        Err("not_found".into())
    );
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// Two loaders share the alarms; one is killed (SIGKILL) while they fire; later every
/// loader is down while alarms fall due, and they fire on recovery. Each alarm is in
/// the log exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_loaders_a_crash_and_a_full_outage_fire_each_alarm_once() -> Result<()> {
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut a = spawn_loader(&server)?;
    let mut b = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 2).await?;
    wait_for_partitions(&client, 2).await?;
    let now = now_ms();
    let n = 60;
    for i in 0..n {
        let due = now + 1_000 + (i as u64 % 20) * 100;
        set(
            &client,
            set_body(&format!("r{i}"), due, "race", &format!("r{i}")),
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    a.kill();
    for i in 0..n {
        wait_status(&client, &format!("r{i}"), "done", 30).await?;
    }
    // Every loader down; alarms fall due; then one comes back.
    let now = now_ms();
    for i in 0..20 {
        set(
            &client,
            set_body(&format!("o{i}"), now + 500, "race", &format!("o{i}")),
        )
        .await?;
    }
    b.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarted = now_ms();
    let mut c = spawn_loader(&server)?;
    wait_for_loaders(&client, 1).await?;
    for i in 0..20 {
        let got = wait_status(&client, &format!("o{i}"), "done", 30).await?;
        // Fired on recovery, and its lateness says how long it waited for it.
        let lateness = got["history"]
            .as_array()
            .context("history")?
            .iter()
            .find(|h| h["event"]["event"] == "delivered")
            .and_then(|h| h["event"]["lateness_ms"].as_u64())
            .with_context(|| format!("o{i} delivered without its lateness: {got}"))?;
        assert!(
            lateness >= restarted - (now + 500),
            "o{i}: lateness {lateness} ms, yet it was due {} ms before a loader ran again",
            restarted - (now + 500)
        );
    }
    let b = bodies(&server, "race").await?;
    for i in 0..n {
        assert_eq!(b.get(&format!("r{i}")), Some(&1), "r{i}: {b:?}");
    }
    for i in 0..20 {
        assert_eq!(b.get(&format!("o{i}")), Some(&1), "o{i}: {b:?}");
    }
    assert_eq!(b.len(), n + 20);
    c.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// A subject target that asks for a retry is called again after it with the new
/// body; one with no responder, and one whose responder hears and never answers (a
/// dispatch timeout), are retried with backoff, then dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_targets_retry_when_asked_and_dead_letter_when_they_fail() -> Result<()> {
    let server = server()?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let responder = connect(server.url()).await?;
    let mut sub = responder.subscribe("jobs.work").await?;
    // Hears every call and answers none: each attempt must end as a timeout.
    let mut silent = responder.subscribe("jobs.silent").await?;
    settled(&responder).await?;
    let seen = tokio::spawn(async move {
        let mut bodies = Vec::new();
        while let Some(m) = sub.next().await {
            bodies.push((
                String::from_utf8_lossy(&m.payload).into_owned(),
                m.headers
                    .as_ref()
                    .and_then(|h| h.get("Ts-Alarm-Id"))
                    .map(|v| v.to_string()),
            ));
            let answer = if bodies.len() == 1 {
                json!({"result": "retry", "in_ms": 300, "body_base64": "c2Vjb25k"})
            } else {
                json!({"result": "ok"})
            };
            if let Some(r) = m.reply {
                let _ = responder
                    .publish(r, serde_json::to_vec(&answer).unwrap_or_default().into())
                    .await;
                let _ = responder.flush().await;
            }
            if bodies.len() == 2 {
                return bodies;
            }
        }
        bodies
    });
    let ops = connect_as(&server, Role::Operator).await?;
    let mut dead = ops.subscribe("ts.alarms.dead").await?;
    settled(&ops).await?;
    let now = now_ms();
    alarm(
        &client,
        "set",
        json!({
            "id": "s3", "due_ms": now + 300, "target": {"subject": "jobs.silent"},
            "dispatch_timeout_ms": 300,
            "retry": {"attempts": 2, "backoff_ms": 100, "max_backoff_ms": 100}
        }),
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    alarm(&client, "set", json!({"id": "s1", "due_ms": now + 300, "target": {"subject": "jobs.work"}, "body": "Zmlyc3Q="}))
        .await?
        .map_err(anyhow::Error::msg)?;
    alarm(
        &client,
        "set",
        json!({
            "id": "s2", "due_ms": now + 300, "target": {"subject": "jobs.nobody"},
            "dispatch_timeout_ms": 200,
            "retry": {"attempts": 3, "backoff_ms": 100, "max_backoff_ms": 200}
        }),
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    let got = wait_status(&client, "s1", "done", 20).await?;
    let calls = tokio::time::timeout(Duration::from_secs(5), seen).await??;
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0], ("first".to_string(), Some("s1".to_string())));
    assert_eq!(calls[1].0, "second");
    let events: Vec<&str> = got["history"]
        .as_array()
        .context("history")?
        .iter()
        .filter_map(|h| h["event"]["event"].as_str())
        .collect();
    assert_eq!(
        events,
        ["set", "attempt", "retry_asked", "attempt", "delivered"]
    );
    let got = wait_status(&client, "s2", "dead", 20).await?;
    let failed = got["history"]
        .as_array()
        .context("history")?
        .iter()
        .filter(|h| h["event"]["event"] == "failed")
        .count();
    assert_eq!(failed, 2, "{got}");
    let letter = tokio::time::timeout(Duration::from_secs(5), dead.next())
        .await?
        .context("dead letter")?;
    let letter: Value = serde_json::from_slice(&letter.payload)?;
    assert_eq!(letter["alarm"]["id"], "s2");
    assert!(
        letter["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no responders")),
        "{letter}"
    );
    let got = wait_status(&client, "s3", "dead", 20).await?;
    let reasons: Vec<&str> = got["history"]
        .as_array()
        .context("history")?
        .iter()
        .filter(|h| h["event"]["event"] == "failed")
        .filter_map(|h| h["event"]["reason"].as_str())
        .collect();
    assert_eq!(reasons, ["no answer within 300 ms"], "{got}");
    let last = got["history"]
        .as_array()
        .and_then(|h| h.last())
        .context("history")?;
    assert_eq!(last["event"]["event"], "dead_lettered", "{got}");
    assert_eq!(
        last["event"]["reason"].as_str(),
        Some("attempt 2 of 2: no answer within 300 ms"),
        "{got}"
    );
    // Both attempts reached the silent responder, each marked with its number.
    let mut heard = Vec::new();
    while heard.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(5), silent.next())
            .await?
            .context("silent responder")?;
        heard.push(
            m.headers
                .as_ref()
                .and_then(|h| h.get("Ts-Alarm-Attempt"))
                .map(|v| v.to_string()),
        );
    }
    assert_eq!(heard, [Some("1".to_string()), Some("2".to_string())]);
    loader.terminate(Duration::from_secs(10));
    Ok(())
}

/// Hostile requests, as raw protocol bytes: each gets a typed refusal (or, with a
/// reply subject in our own space, none), and the loader keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_alarm_requests_get_typed_refusals_and_hurt_nothing() -> Result<()> {
    let server = server()?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("set", b"not json".to_vec(), "malformed"),
        ("set", b"".to_vec(), "malformed"),
        ("set", vec![b'x'; 600 * 1024], "too_large"),
        (
            "set",
            br#"{"id":"a.b","due_ms":1,"target":{"process":"p"}}"#.to_vec(),
            "invalid_alarm",
        ),
        (
            "set",
            br#"{"id":"x","due_ms":1,"target":{"subject":"ts.log.p"}}"#.to_vec(),
            "invalid_alarm",
        ),
        (
            "set",
            br#"{"id":"x","due_ms":1,"target":{"subject":"$JS.API.STREAM.DELETE.TS_LOG"}}"#
                .to_vec(),
            "invalid_alarm",
        ),
        (
            "set",
            br#"{"id":"x","due_ms":1,"target":{"process":"p"},"headers":[["Ts-Mode","disabled"]]}"#
                .to_vec(),
            "invalid_alarm",
        ),
        ("get", br#"{"id":"../../etc"}"#.to_vec(), "invalid_alarm"),
        (
            "set",
            br#"{"id":"x","due_ms":99999999999999,"target":{"process":"p"}}"#.to_vec(),
            "invalid_alarm",
        ),
        (
            "set",
            br#"{"id":"x","due_ms":1,"target":{"queue":"p"}}"#.to_vec(),
            "malformed",
        ),
        (
            "set",
            br#"{"id":"cron-x-1","due_ms":1,"target":{"process":"p"}}"#.to_vec(),
            "invalid_alarm",
        ),
        (
            "list",
            br#"{"from_ms":10,"to_ms":1}"#.to_vec(),
            "invalid_range",
        ),
        ("drop", b"{}".to_vec(), "malformed"),
        ("set_many", b"".to_vec(), "malformed"),
        ("set_many", b"\x00\xff garbage".to_vec(), "malformed"),
        ("set_many", br#"{"alarms":5}"#.to_vec(), "malformed"),
        ("set_many", br#"{"alarms":[1]}"#.to_vec(), "malformed"),
        ("set_many", br#"{"alarms":[],"x":1}"#.to_vec(), "malformed"),
        ("set_many", br#"[{"id":"x"}]"#.to_vec(), "malformed"),
        ("set_many", vec![b'x'; 600 * 1024], "too_large"),
        (
            "set_many",
            format!(
                r#"{{"alarms":[{}]}}"#,
                vec![r#"{"id":"x","due_ms":1,"target":{"process":"p"}}"#; 1001].join(",")
            )
            .into_bytes(),
            "invalid_alarm",
        ),
    ];
    for (op, body, code) in cases {
        let reply = client
            .request(format!("ts.alarm.{op}"), body.into())
            .await?;
        let got = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Ts-Error"))
            .map(|v| v.to_string());
        assert_eq!(got.as_deref(), Some(code), "{op}");
    }
    // Raw bytes: a header block that does not parse, and a reply into our own space.
    let addr = server.url().trim_start_matches("nats://").to_string();
    let mut raw = tokio::net::TcpStream::connect(&addr).await?;
    let mut info = vec![0u8; 4096];
    let _ = raw.read(&mut info).await?;
    let inbox = "_INBOX.raw.1";
    let headers = b"NATS/1.0\r\nbad header line\r\n\r\n";
    let mut out = Vec::new();
    out.extend_from_slice(
        b"CONNECT {\"verbose\":false,\"headers\":true,\"no_responders\":true}\r\n",
    );
    out.extend_from_slice(format!("SUB {inbox} 1\r\n").as_bytes());
    out.extend_from_slice(
        format!(
            "HPUB ts.alarm.set {inbox} {} {}\r\n",
            headers.len(),
            headers.len() + 2
        )
        .as_bytes(),
    );
    out.extend_from_slice(headers);
    out.extend_from_slice(b"{}\r\n");
    out.extend_from_slice(b"PUB ts.alarm.set ts.alarms.rec.evil 2\r\n{}\r\nPING\r\n");
    raw.write_all(&out).await?;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&got).contains("malformed_request") {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, raw.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => bail!(
                "no malformed_request answer: {}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    // Nothing was written where the evil reply pointed.
    let js = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    let stream = js.get_stream("TS_ALARMS").await?;
    assert!(stream
        .get_last_raw_message_by_subject("ts.alarms.rec.evil")
        .await
        .is_err());
    // Still serving.
    let ok = alarm(
        &client,
        "set",
        set_body("after", now_ms() + 3_600_000, "p", "x"),
    )
    .await?;
    assert!(ok.is_ok(), "{ok:?}");
    assert!(loader.exited().is_none());
    loader.terminate(Duration::from_secs(10));
    Ok(())
}

/// A loader that died after its firing reached the log and before it recorded the
/// outcome, with every loader down for longer than the scheduler's idempotency window:
/// the successor finds the firing in the log (by its message id) and records it, and
/// does not send it again. The dead loader's state is written here by hand: its claim,
/// and its firing in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_older_than_the_idempotency_window_is_found_in_the_log_not_sent_again(
) -> Result<()> {
    firing_beyond_the_window(false).await
}

/// An attempt that failed on the loader's side (its dispatch timed out) but whose
/// write landed, retried after a backoff longer than the scheduler's idempotency
/// window: the retry finds the firing in the log and records it, and does not send it
/// again (it used to: the same message id, past the window, got a second slot). The
/// failed attempt's records are written here by hand, and its late write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_past_the_idempotency_window_finds_an_attempt_that_landed_late() -> Result<()> {
    firing_beyond_the_window(true).await
}

/// The loader's STATS counters (one loader).
async fn loader_data(client: &async_nats::Client) -> Result<Value> {
    let m = client
        .request("$SRV.STATS.turnstile-alarm-loader", Bytes::new())
        .await?;
    let v: Value = serde_json::from_slice(&m.payload)?;
    Ok(v["endpoints"][0]["data"].clone())
}

/// A process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM in /proc/<pid>/status")
}

/// Hundreds of alarms with the largest body, due at once: each fires once, the
/// loader keeps its connection and its leases, and its memory stays bounded (its peak
/// resident set). Batch reads ask for at most 4 MiB and drop a large record before
/// decoding it, at most 16 records are read alone at once, and the bodies of the
/// dispatches in flight share a budget. Before, with 800 such alarms, the server cut
/// the loader's connection as a slow consumer (a batch read, or 256 lone reads, asked
/// for more than its 64 MB pending limit), every lease was lost, firings were taken
/// over and 5 were still unfired after 180 s; in a luckier run the peak was 337 MiB
/// (145 MiB now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_bodies_due_at_once_fire_once_in_bounded_memory() -> Result<()> {
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let n = 500usize;
    let body = "b".repeat(alarm_loader::alarm::MAX_BODY);
    let due = now_ms() + 20_000;
    for i in 0..n {
        let process = format!("heavy-{}", i % 10);
        set(&client, set_body(&format!("big-{i}"), due, &process, &body)).await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let data = loader_data(&client).await?;
        if data["delivered"].as_u64() >= Some(n as u64) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("not every alarm fired within 180 s: {data}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let peak_mib = peak_rss_kib(loader.pid().context("the loader runs")?)? / 1024;
    let mut fired = 0;
    for p in 0..10 {
        let log = read_log(server.url(), &ProcessId::new(format!("heavy-{p}"))?).await?;
        assert!(log
            .iter()
            .all(|e| e.body.len() == alarm_loader::alarm::MAX_BODY));
        fired += log.len();
    }
    assert_eq!(fired, n, "each alarm once in the logs");
    eprintln!("loader peak RSS {peak_mib} MiB for {n} alarms of 256 KiB");
    assert!(peak_mib < 256, "the loader's peak RSS was {peak_mib} MiB");
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// A retry after an attempt the scheduler refused with nothing written (the process
/// was disabled) does not look for the firing in the log first: that look (a
/// bisection of the process's log) is paid only where an earlier attempt may have
/// landed (a timeout), so a flood of `busy` refusals does not become a flood of reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_refusal_that_wrote_nothing_does_not_look_in_the_log() -> Result<()> {
    use protocol::wire::{Mode, ProcessConfig};
    let server = server()?;
    let js = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    let settings = journal::setup::ensure_processes(
        &js,
        &journal::subjects::Subjects::default(),
        &Default::default(),
    )
    .await?;
    let config = |mode| ProcessConfig { mode, keys: vec![] }.encode();
    settings
        .put("shut", config(Some(Mode::Disabled))?.into())
        .await?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    set(
        &client,
        set_body("knock", now_ms() + 300, "shut", "let me in"),
    )
    .await?;
    // Refused (disabled), then opened: a retry delivers it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while loader_data(&client).await?["failed"].as_u64() < Some(1) {
        if tokio::time::Instant::now() > deadline {
            bail!("the attempt was not refused");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settings.put("shut", config(None)?.into()).await?;
    let got = wait_status(&client, "knock", "done", 60).await?;
    let data = loader_data(&client).await?;
    assert!(data["failed"].as_u64() >= Some(1), "{data}");
    assert_eq!(data["firing_lookups"], 0, "{data}");
    assert_eq!(
        read_log(server.url(), &ProcessId::new("shut")?)
            .await?
            .len(),
        1
    );
    assert!(got["history"].to_string().contains("disabled"), "{got}");
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// The two cases above: a dead loader's claim (`failed` false), or a failed attempt
/// whose retry is due (`failed` true); in both the firing is in the log, older than
/// the scheduler's idempotency window.
async fn firing_beyond_the_window(failed: bool) -> Result<()> {
    use alarm_loader::alarm::{Alarm, Record, RetryPolicy, Target};
    let server = server()?;
    let config = Config {
        dedupe_window: Duration::from_secs(1),
        ..Config::default()
    };
    let sched = InProcess::start(&server, config.clone(), vec![test_key(1)]).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let store = alarm_loader::store::Store::open(
        async_nats::jetstream::new(operator.clone()),
        journal::subjects::Subjects::default(),
        &journal::setup::LogOptions::default(),
    )
    .await?;
    // The dead loader's claim, made 10 s ago (past its 5 s dispatch timeout)...
    let now = now_ms();
    let alarm = Alarm {
        id: "orphan".into(),
        due_ms: now - 10_000,
        target: Target::Process("orphaned".into()),
        body: b"once".to_vec(),
        headers: Vec::new(),
        dispatch_timeout_ms: 5_000,
        retry: RetryPolicy::default(),
        cron: None,
    };
    // (Its entry where the set put it: never behind the stream's present.)
    store.put_due("orphan", now, now - 10_000).await?;
    let seq = store.append(&Record::set(alarm, now - 10_000), 0).await?;
    let (set, _) = store
        .read("orphan")
        .await?
        .context("the record just written")?;
    let claim = set
        .claim(now - 10_000, "dead-loader")
        .context("a pending alarm can be claimed")?;
    let claim_seq = store.append(&claim, seq).await?;
    if failed {
        // Its dispatch timed out at -5 s; the retry is due at -4 s.
        let (retry, dead) = claim.failed(now - 5_000, "timed out");
        assert!(!dead);
        store.put_due("orphan", now - 4_000, now - 5_000).await?;
        store.append(&retry, claim_seq).await?;
    }
    // ...and its firing, which reached the log.
    let nats = connect(server.url()).await?;
    crate::support::wait_for_schedulers(&nats, 1).await?;
    let client = journal::client::Client::new(nats.clone(), journal::subjects::Subjects::default());
    let receipt = client
        .schedule(
            &ProcessId::new("orphaned")?,
            Bytes::from_static(b"once"),
            &journal::client::Schedule {
                message_id: Some(claim.firing_id(store.firing_key())),
                ..Default::default()
            },
        )
        .await?;
    // Past the scheduler's idempotency window: the same message id would get a new slot
    // (a scheduler started now reads only the window's ids; a running one may still
    // hold an older id until it prunes).
    // The process moves on (the head run no longer holds the firing).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for i in 0..3 {
        client
            .schedule(
                &ProcessId::new("orphaned")?,
                Bytes::from(format!("later {i}")),
                &journal::client::Schedule::default(),
            )
            .await?;
    }
    sched.stop().await?;
    let sched = InProcess::start(&server, config, vec![test_key(1)]).await?;
    crate::support::wait_for_schedulers(&nats, 1).await?;
    let mut loader = spawn_loader(&server)?;
    wait_for_loaders(&nats, 1).await?;
    let got = wait_status(&nats, "orphan", "done", 30).await?;
    let data = loader_data(&nats).await?;
    assert_eq!(data["firing_lookups"], 1, "{data}");
    assert_eq!(data["firings_found"], 1, "{data}");
    assert_eq!(got["status"]["slot"].as_u64(), Some(receipt.slot), "{got}");
    let delivered = got["history"]
        .as_array()
        .and_then(|h| h.iter().find(|e| e["event"]["event"] == "delivered"))
        .context("a delivered event")?;
    assert_eq!(delivered["event"]["duplicate"], true, "{delivered}");
    let log = read_log(server.url(), &ProcessId::new("orphaned")?).await?;
    assert_eq!(
        log.len(),
        4,
        "the firing was sent again: {} entries",
        log.len()
    );
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// Alarms fire in due order, and a replace or a cancel of an alarm already loaded in
/// the loader's window takes effect there: the replaced one fires once, with its new
/// body at its new time; the cancelled one never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_fire_in_due_order_and_changes_reach_the_window() -> Result<()> {
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let start = now_ms() + 2_500;
    // Set in reverse order, 300 ms apart.
    for i in (0..8u64).rev() {
        set(
            &client,
            set_body(
                &format!("o{i}"),
                start + i * 300,
                "ordered",
                &format!("o{i}"),
            ),
        )
        .await?;
    }
    set(
        &client,
        set_body("moved", start + 600, "ordered", "old body"),
    )
    .await?;
    set(&client, set_body("gone", start + 900, "ordered", "gone")).await?;
    // Loaded by now (the loader loads every 300 ms, its whole 10 s bucket).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    set(
        &client,
        set_body("moved", start + 2_700, "ordered", "new body"),
    )
    .await?;
    alarm(&client, "cancel", json!({"id": "gone"}))
        .await?
        .map_err(anyhow::Error::msg)?;
    wait_status(&client, "moved", "done", 20).await?;
    wait_status(&client, "o7", "done", 20).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = read_log(server.url(), &ProcessId::new("ordered")?).await?;
    let bodies: Vec<String> = log
        .iter()
        .map(|e| String::from_utf8_lossy(&e.body).into_owned())
        .collect();
    let ordered: Vec<&String> = bodies.iter().filter(|b| b.starts_with('o')).collect();
    let expected: Vec<String> = (0..8).map(|i| format!("o{i}")).collect();
    assert_eq!(
        ordered,
        expected.iter().collect::<Vec<_>>(),
        "fired out of due order: {bodies:?}"
    );
    assert_eq!(
        bodies.iter().filter(|b| *b == "new body").count(),
        1,
        "{bodies:?}"
    );
    assert!(
        !bodies.iter().any(|b| b == "old body" || b == "gone"),
        "{bodies:?}"
    );
    let moved = log
        .iter()
        .find(|e| e.body == b"new body")
        .context("the replaced alarm")?;
    assert!(
        moved.timestamp_ms >= start + 2_700,
        "fired before its new time"
    );
    wait_status(&client, "gone", "cancelled", 1).await?;
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// The subjects of `TS_ALARMS` under `filter` that hold messages now.
async fn stored_subjects(server: &NatsServer, filter: &str) -> Result<Vec<String>> {
    use futures::TryStreamExt as _;
    let op = connect_as(server, Role::Operator).await?;
    let js = async_nats::jetstream::new(op);
    let stream = js.get_stream("TS_ALARMS").await?;
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects(filter)
        .await?
        .try_collect()
        .await?;
    Ok(subjects.into_iter().map(|(s, _)| s).collect())
}

/// The partition checkpoint `ts.alarms.swept.<p>`: the last bucket known empty.
async fn swept(server: &NatsServer, partition: u32) -> Result<Option<u64>> {
    let op = connect_as(server, Role::Operator).await?;
    let js = async_nats::jetstream::new(op);
    let stream = js.get_stream("TS_ALARMS").await?;
    match stream
        .get_last_raw_message_by_subject(&format!("ts.alarms.swept.{partition}"))
        .await
    {
        Ok(m) => Ok(std::str::from_utf8(&m.payload)?.trim().parse().ok()),
        Err(_) => Ok(None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fired_buckets_are_emptied_at_once_and_a_replaced_alarms_new_entry_survives() -> Result<()>
{
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let now = now_ms();
    let due = now + 1_000;
    let ids: Vec<String> = (0..40).map(|i| format!("sweep-{i}")).collect();
    for id in &ids {
        set(&client, set_body(id, due, "swept", id)).await?;
    }
    // Set for soon, then moved to 25 s ahead (two buckets on): its first entry's
    // bucket is swept while the alarm waits for its new time.
    let moved_due = now + 25_000;
    set(&client, set_body("moved", now + 1_000, "swept", "moved")).await?;
    set(&client, set_body("moved", moved_due, "swept", "moved")).await?;
    for id in &ids {
        wait_status(&client, id, "done", 30).await?;
    }
    // Their bucket holds nothing any more once it is past (the partitions'
    // checkpoints pass it only a minute later: tested by
    // a_loader_whose_clock_runs_ahead_does_not_sweep_past_an_entry_others_still_write).
    let bucket = due / 10_000;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let left = stored_subjects(&server, &format!("ts.alarms.due.*.{bucket}.*")).await?;
        if left.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("after 40 s: bucket {bucket} still holds {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The moved alarm was not fired at its old time, its new entry is still indexed,
    // and it fires at its new time, once.
    let moved_bucket = moved_due / 10_000;
    let got = alarm(&client, "get", json!({"id": "moved"}))
        .await?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(got["status"]["status"], "pending", "{got}");
    let entry = stored_subjects(&server, &format!("ts.alarms.due.*.{moved_bucket}.moved")).await?;
    assert_eq!(entry.len(), 1, "the moved alarm's entry: {entry:?}");
    let got = wait_status(&client, "moved", "done", 40).await?;
    let log = read_log(server.url(), &ProcessId::new("swept")?).await?;
    let fired: Vec<_> = log.iter().filter(|e| &e.body[..] == b"moved").collect();
    assert_eq!(fired.len(), 1, "{got}");
    assert!(fired[0].timestamp_ms >= moved_due);
    assert_eq!(log.len(), ids.len() + 1);
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// The dead letter is stored before the record that makes the alarm `dead`: a loader
/// that dies between the two leaves the claim (taken over, the last attempt made
/// again), never a dead alarm whose letter was not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_stored_before_the_record_that_ends_the_alarm() -> Result<()> {
    let server = server()?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    set(
        &client,
        json!({
            "id": "gone", "due_ms": now_ms() + 300, "target": {"subject": "jobs.nobody"},
            "dispatch_timeout_ms": 200,
            "retry": {"attempts": 2, "backoff_ms": 100, "max_backoff_ms": 100}
        }),
    )
    .await?;
    let got = wait_status(&client, "gone", "dead", 20).await?;
    let dead_seq = got["history"]
        .as_array()
        .and_then(|h| h.iter().find(|e| e["event"]["event"] == "dead_lettered"))
        .and_then(|e| e["seq"].as_u64())
        .context("a dead_lettered record")?;
    let op = connect_as(&server, Role::Operator).await?;
    let stream = async_nats::jetstream::new(op)
        .get_stream("TS_ALARMS")
        .await?;
    let letter = stream
        .get_last_raw_message_by_subject("ts.alarms.dead")
        .await
        .context("the dead letter is stored")?;
    let body: Value = serde_json::from_slice(&letter.payload)?;
    assert_eq!(body["alarm"]["id"], "gone", "{body}");
    assert_eq!(body["status"]["status"], "dead", "{body}");
    assert!(
        letter.sequence < dead_seq,
        "dead letter at {}, the dead record at {dead_seq}: the record came first",
        letter.sequence
    );
    loader.terminate(Duration::from_secs(10));
    Ok(())
}

/// A message someone else appends to an alarm's subject while it is being dispatched
/// makes the outcome's compare-and-set fail; the record still stands as the claim left
/// it, so the outcome is written after that message and the claim ends at once (it
/// used to be left `dispatching`, and the firing was sent again at its takeover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_whose_write_lost_to_a_foreign_message_still_ends_the_claim() -> Result<()> {
    let server = server()?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let op = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(op);
    let responder = connect(server.url()).await?;
    let mut sub = responder.subscribe("jobs.fenced").await?;
    settled(&responder).await?;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = std::sync::Arc::clone(&calls);
    let answering = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            // While the loader waits for this answer, a foreign message lands after
            // its claim.
            if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                let ack = js
                    .publish("ts.alarms.rec.fenced", Bytes::from_static(b"not a record"))
                    .await;
                if let Ok(ack) = ack {
                    let _ = ack.await;
                }
            }
            if let Some(r) = m.reply {
                let _ = responder.publish(r, Bytes::from_static(b"")).await;
                let _ = responder.flush().await;
            }
        }
    });
    set(
        &client,
        json!({
            "id": "fenced", "due_ms": now_ms() + 300, "target": {"subject": "jobs.fenced"},
            "dispatch_timeout_ms": 60_000
        }),
    )
    .await?;
    // Well within the claim's takeover (60 s and the grace).
    let got = wait_status(&client, "fenced", "done", 15).await?;
    let events: Vec<&str> = got["history"]
        .as_array()
        .context("history")?
        .iter()
        .filter_map(|h| h["event"]["event"].as_str())
        .collect();
    assert_eq!(events, ["set", "attempt", "delivered"], "{got}");
    assert_eq!(got["foreign"].as_array().map(Vec::len), Some(1), "{got}");
    loader.terminate(Duration::from_secs(10));
    answering.abort();
    let calls = calls.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(calls, 1, "the target was called {calls} times");
    Ok(())
}

/// A loader in this process (300 ms loads, 2 s lease) whose clock is the system's
/// shifted by `offset` ms, which the test may move; cancel the token to stop it.
async fn loader_with_clock(
    server: &NatsServer,
    offset: &std::sync::Arc<std::sync::atomic::AtomicI64>,
) -> Result<(
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<alarm_loader::Result<()>>,
)> {
    let offset = std::sync::Arc::clone(offset);
    let system = alarm_loader::loader::system_clock();
    let clock: alarm_loader::loader::Clock = std::sync::Arc::new(move || {
        system().saturating_add_signed(offset.load(std::sync::atomic::Ordering::Relaxed))
    });
    let settings = alarm_loader::Settings {
        prefix: "ts".into(),
        replicas: 1,
        loader: alarm_loader::loader::Config {
            in_memory_interval: Duration::from_millis(300),
            lease: Duration::from_secs(2),
            ..Default::default()
        },
        max_answering: alarm_loader::MAX_ANSWERING,
    };
    let connections = alarm_loader::Connections {
        core: connect_as(server, Role::AlarmLoader).await?,
        intake: Some(connect_as(server, Role::AlarmIntake).await?),
        events: Default::default(),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(alarm_loader::run(
        settings,
        connections,
        shutdown.clone(),
        clock,
    ));
    Ok((shutdown, handle))
}

/// The window loads a loader has made (`loads` in its STATS; one loader).
async fn loads(client: &async_nats::Client) -> Result<u64> {
    let reply = client
        .request("$SRV.STATS.turnstile-alarm-loader", Bytes::new())
        .await?;
    let v: Value = serde_json::from_slice(&reply.payload)?;
    v["endpoints"][0]["data"]["loads"]
        .as_u64()
        .context("loads in STATS")
}

/// A loader whose clock runs ahead sweeps no closer than a minute to its present: a
/// set answered by a loader whose clock is right (or behind) indexes at its own
/// present, and a holder that catches the partition up from a checkpoint past that
/// entry would never fire it. The loader restarted with its fast clock finds the
/// alarm; the checkpoint passes its bucket once that is a minute behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_whose_clock_runs_ahead_does_not_sweep_past_an_entry_others_still_write(
) -> Result<()> {
    use alarm_loader::alarm::{bucket_of, partition_of, Alarm, Record, RetryPolicy, Target};
    use std::sync::atomic::{AtomicI64, Ordering};
    let server = server()?;
    let client = connect(server.url()).await?;
    let responder = connect(server.url()).await?;
    let mut sub = responder.subscribe("jobs.lag").await?;
    settled(&responder).await?;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = std::sync::Arc::clone(&calls);
    let answering = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            counted.fetch_add(1, Ordering::SeqCst);
            if let Some(r) = m.reply {
                let _ = responder.publish(r, Bytes::new()).await;
                let _ = responder.flush().await;
            }
        }
    });
    let offset = std::sync::Arc::new(AtomicI64::new(0));
    let (stop, first) = loader_with_clock(&server, &offset).await?;
    wait_for_partitions(&client, 1).await?;
    // Its clock jumps 45 s ahead (as a loader restarted with a fast clock); it loads
    // and sweeps a few rounds with it.
    let before = loads(&client).await?;
    offset.store(45_000, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while loads(&client).await? <= before {
        if tokio::time::Instant::now() > deadline {
            bail!("no window load within 10 s of the clock's jump");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.cancel();
    first.await??;
    // Now a loader whose clock is right answers a set due now: its entry is in the
    // bucket of the present (written here as that set writes it).
    let id = "lagged";
    let p = partition_of(id);
    let now = now_ms();
    let checkpoint = swept(&server, p).await?;
    assert!(
        checkpoint.is_none_or(|c| c < bucket_of(now)),
        "the fast loader swept partition {p} through bucket {checkpoint:?}, past the present's {}",
        bucket_of(now)
    );
    let store = crate::support::operator_store(&server).await?;
    let alarm = Alarm {
        id: id.into(),
        due_ms: now,
        target: Target::Subject("jobs.lag".into()),
        body: Vec::new(),
        headers: Vec::new(),
        dispatch_timeout_ms: 5_000,
        retry: RetryPolicy::default(),
        cron: None,
    };
    store.put_due(id, now, now).await?;
    store.append(&Record::set(alarm, now), 0).await?;
    // The fast loader, restarted, catches the partition up and fires it.
    let (stop, second) = loader_with_clock(&server, &offset).await?;
    wait_status(&client, id, "done", 20).await?;
    // A minute on (by its clock), the checkpoint passes the alarm's bucket, emptied.
    offset.store(45_000 + 90_000, Ordering::Relaxed);
    let bucket = bucket_of(now);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let c = swept(&server, p).await?;
        let left = stored_subjects(&server, &format!("ts.alarms.due.{p}.{bucket}.*")).await?;
        if c.is_some_and(|c| c >= bucket) && left.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "partition {p}: checkpoint {c:?}, not past bucket {bucket}; entries left: {left:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    second.await??;
    answering.abort();
    let calls = calls.load(Ordering::SeqCst);
    assert_eq!(calls, 1, "the target was called {calls} times");
    Ok(())
}

/// The alarm's `get` answer (it must exist).
async fn get_alarm(client: &async_nats::Client, id: &str) -> Result<Value> {
    alarm(client, "get", json!({"id": id}))
        .await?
        .map_err(anyhow::Error::msg)
}

/// A set of a new id writes its record without reading first (expecting an empty
/// subject); a set of a stored id still replaces it and moves its entry at once; a set
/// of an id whose subject holds only a foreign message is refused by that expectation
/// and then writes after the foreign message, as a replace does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_id_is_created_without_a_read_and_a_stored_one_is_replaced_with_its_entry_moved(
) -> Result<()> {
    use alarm_loader::alarm::bucket_of;
    let server = server()?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator.clone());
    let first_due = now_ms() + 3_600_000;
    let created = set(&client, set_body("fresh", first_due, "p", "one")).await?;
    assert_eq!(created["replaced"], false, "{created}");
    let first_seq = created["seq"].as_u64().context("seq")?;
    // Stored as every genuine write is: its only header the expectation (0: none).
    let stream = js.get_stream("TS_ALARMS").await?;
    let raw = stream.get_raw_message(first_seq).await?;
    assert_eq!(
        raw.headers
            .get("Nats-Expected-Last-Subject-Sequence")
            .map(|v| v.as_str()),
        Some("0"),
        "{:?}",
        raw.headers
    );
    assert_eq!(raw.headers.len(), 1, "{:?}", raw.headers);
    let old_entry = format!("ts.alarms.due.*.{}.fresh", bucket_of(first_due));
    assert_eq!(stored_subjects(&server, &old_entry).await?.len(), 1);

    // Replaced two hours on: the old entry is gone at once (no firing, no sweep
    // involved), the new one is there.
    let second_due = first_due + 3_600_000;
    let replaced = set(&client, set_body("fresh", second_due, "p", "two")).await?;
    assert_eq!(replaced["replaced"], true, "{replaced}");
    assert!(replaced["seq"].as_u64().context("seq")? > first_seq);
    assert!(stored_subjects(&server, &old_entry).await?.is_empty());
    let new_entry = format!("ts.alarms.due.*.{}.fresh", bucket_of(second_due));
    assert_eq!(stored_subjects(&server, &new_entry).await?.len(), 1);
    let got = get_alarm(&client, "fresh").await?;
    assert_eq!(got["alarm"]["due_ms"], second_due, "{got}");
    assert_eq!(got["history"].as_array().map(Vec::len), Some(2), "{got}");
    assert_eq!(got["foreign"], json!([]), "{got}");

    // Its first record replayed after the second (the body alone: a plain publish):
    // the next set is not misled by it (the replay is foreign, the state the second
    // record) and writes after it.
    let replay = js
        .publish("ts.alarms.rec.fresh", raw.payload.clone())
        .await?
        .await?
        .sequence;
    let third_due = second_due + 3_600_000;
    let again = set(&client, set_body("fresh", third_due, "p", "three")).await?;
    assert_eq!(again["replaced"], true, "{again}");
    assert!(stored_subjects(&server, &new_entry).await?.is_empty());
    let got = get_alarm(&client, "fresh").await?;
    assert_eq!(got["alarm"]["due_ms"], third_due, "{got}");
    assert_eq!(got["history"].as_array().map(Vec::len), Some(3), "{got}");
    assert_eq!(got["foreign"][0]["seq"], replay, "{got}");

    // A foreign message first on a subject: the set writes after it.
    let garbage = js
        .publish("ts.alarms.rec.squatted", "not a record".into())
        .await?
        .await?
        .sequence;
    let over = set(&client, set_body("squatted", first_due, "p", "mine")).await?;
    assert_eq!(over["replaced"], false, "{over}");
    let got = get_alarm(&client, "squatted").await?;
    assert_eq!(got["alarm"]["due_ms"], first_due, "{got}");
    assert_eq!(got["history"].as_array().map(Vec::len), Some(1), "{got}");
    assert_eq!(got["foreign"][0]["seq"], garbage, "{got}");
    let entry = format!("ts.alarms.due.*.{}.squatted", bucket_of(first_due));
    assert_eq!(stored_subjects(&server, &entry).await?.len(), 1);
    loader.terminate(Duration::from_secs(10));
    Ok(())
}

/// Sets of one new id racing each other: one creates it, every other one that is
/// accepted replaced it (or is refused `busy` after losing three times); the history
/// holds exactly the accepted records, and the last one's entry is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_sets_of_a_new_id_create_it_once_and_leave_the_winners_entry() -> Result<()> {
    use alarm_loader::alarm::bucket_of;
    let server = server()?;
    let mut loader = spawn_loader(&server)?;
    wait_for_loaders(&connect(server.url()).await?, 1).await?;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(server.url()).await?);
    }
    let base = now_ms() + 3_600_000;
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let c = clients[i as usize % clients.len()].clone();
        // Each in a bucket of its own.
        let due = base + i * 20_000;
        tasks.push(tokio::spawn(async move {
            alarm(&c, "set", set_body("contended", due, "p", &format!("b{i}"))).await
        }));
    }
    let (mut created, mut accepted, mut busy) = (0, Vec::new(), 0);
    for t in tasks {
        match t.await?? {
            Ok(v) => {
                if v["replaced"] == false {
                    created += 1;
                }
                accepted.push(v["seq"].as_u64().context("seq")?);
            }
            Err(code) if code == "busy" => busy += 1,
            Err(code) => bail!("a set refused {code}"),
        }
    }
    assert_eq!(created, 1, "accepted {accepted:?}, busy {busy}");
    let client = &clients[0];
    let got = get_alarm(client, "contended").await?;
    let mut history: Vec<u64> = got["history"]
        .as_array()
        .context("history")?
        .iter()
        .filter_map(|h| h["seq"].as_u64())
        .collect();
    history.sort_unstable();
    accepted.sort_unstable();
    assert_eq!(history, accepted, "{got}");
    assert_eq!(got["foreign"], json!([]), "{got}");
    let last_due = got["alarm"]["due_ms"].as_u64().context("due_ms")?;
    let entry = format!("ts.alarms.due.*.{}.contended", bucket_of(last_due));
    assert_eq!(
        stored_subjects(&server, &entry).await?.len(),
        1,
        "the state's entry is missing: {got}"
    );
    loader.terminate(Duration::from_secs(10));
    Ok(())
}

/// Sets of an alarm already due racing the loader's claims of it: each record fires at
/// most once, and the last one set (which nothing replaced) fires exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_racing_the_loaders_claims_fire_each_record_at_most_once_and_the_last_once(
) -> Result<()> {
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    wait_for_partitions(&client, 1).await?;
    let n = 20;
    for i in 0..n {
        set(
            &client,
            set_body(
                "raced",
                now_ms().saturating_sub(1_000),
                "racing",
                &format!("r{i}"),
            ),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(i % 3 * 5)).await;
    }
    let last = format!("r{}", n - 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let b = bodies(&server, "racing").await.unwrap_or_default();
        if b.get(&last) == Some(&1) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the last set never fired: {b:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_status(&client, "raced", "done", 10).await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let b = bodies(&server, "racing").await?;
    assert!(b.values().all(|&c| c == 1), "a record fired twice: {b:?}");
    assert_eq!(b.get(&last), Some(&1), "{b:?}");
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// More requests at once than a loader answers (`--max-answering 4`): the rest are
/// refused `busy` at once, every request gets one answer, and what was accepted is
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_answering_bound_are_refused_busy_and_none_is_left_unanswered(
) -> Result<()> {
    let server = server()?;
    let mut loader = harness::Process::spawn(crate::support::loader_command(
        &server,
        &["--max-answering", "4"],
    )?)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let n = 400usize;
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(format!("{inbox}.*")).await?;
    let due = now_ms() + 3_600_000;
    for i in 0..n {
        client
            .publish_with_reply(
                "ts.alarm.set",
                format!("{inbox}.{i}"),
                serde_json::to_vec(&set_body(&format!("flood-{i}"), due, "p", "x"))?.into(),
            )
            .await?;
    }
    client.flush().await?;
    let (mut ok, mut busy) = (Vec::new(), 0);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(20), answers.next())
            .await
            .with_context(|| format!("{} of {n} answered", seen.len()))?
            .context("answers ended")?;
        let i: usize = m.subject.rsplit('.').next().context("token")?.parse()?;
        assert!(seen.insert(i), "request {i} answered twice");
        match m.headers.as_ref().and_then(|h| h.get("Ts-Error")) {
            None => ok.push(i),
            Some(code) if code.as_str() == "busy" => busy += 1,
            Some(code) => bail!("request {i} refused {code}"),
        }
    }
    assert!(busy > 0, "nothing refused busy with 4 answered at once");
    assert!(!ok.is_empty(), "nothing accepted");
    for i in ok.iter().take(20) {
        let got = get_alarm(&client, &format!("flood-{i}")).await?;
        assert_eq!(got["alarm"]["due_ms"], due, "{got}");
    }
    loader.terminate(Duration::from_secs(10));
    Ok(())
}

/// A replaced alarm's old entry is removed only up to the record that replaced it: an
/// entry a later change wrote in that bucket (after reading that record) stays, so a
/// removal that comes late never takes the entry of the record that wins next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_replaced_entry_keeps_one_written_after_the_replacing_record() -> Result<()> {
    use alarm_loader::alarm::{bucket_of, Alarm, Record, RetryPolicy, Target};
    let server = server()?;
    let operator = connect_as(&server, Role::Operator).await?;
    let store = alarm_loader::store::Store::open(
        async_nats::jetstream::new(operator.clone()),
        journal::subjects::Subjects::default(),
        &journal::setup::LogOptions::default(),
    )
    .await?;
    let now = now_ms();
    let old_at = now + 3_600_000;
    let alarm = Alarm {
        id: "moved-twice".into(),
        due_ms: old_at,
        target: Target::Process("p".into()),
        body: b"x".to_vec(),
        headers: Vec::new(),
        dispatch_timeout_ms: 5_000,
        retry: RetryPolicy::default(),
        cron: None,
    };
    // The first record and its entry.
    store.put_due(&alarm.id, old_at, now).await?;
    let first = store.append(&Record::set(alarm.clone(), now), 0).await?;
    // A set moves it away (its record replaces the first)...
    let moved = Alarm {
        due_ms: old_at + 3_600_000,
        ..alarm.clone()
    };
    store.put_due(&moved.id, moved.due_ms, now).await?;
    let second = store.append(&Record::set(moved, now), first).await?;
    // ...and a third change, which read the second record, moves it back and writes its
    // entry before the second set's removal comes.
    store.put_due(&alarm.id, old_at, now).await?;
    let third = store
        .append(&Record::set(alarm.clone(), now), second)
        .await?;
    store.remove_due(&alarm.id, old_at, second).await?;
    let entry = format!("ts.alarms.due.*.{}.moved-twice", bucket_of(old_at));
    assert_eq!(
        stored_subjects(&server, &entry).await?.len(),
        1,
        "the entry of record {third} was removed"
    );
    // The third record's own removal of that bucket (bounded by a later record) does
    // take it.
    store.remove_due(&alarm.id, old_at, third + 1).await?;
    assert!(stored_subjects(&server, &entry).await?.is_empty());
    Ok(())
}

/// The window is loaded beside the loop, which fires meanwhile: an alarm set while a
/// load reads its bucket (the load may have read the bucket before the alarm's entry
/// was stored, and the entry's watch came before the bucket counted as loaded) is
/// armed all the same. A bucket of 3,000 alarms makes its load long; alarms are set
/// into it one after another while the horizon reaches it; every one fires, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_set_while_their_bucket_is_being_loaded_fire() -> Result<()> {
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    // A bucket starting 8 to 18 s from now.
    let bucket_ms = (now_ms() + 8_000) / 10_000 * 10_000 + 10_000;
    let prefill: Vec<Value> = (0..3_000u64)
        .map(|i| {
            set_body(
                &format!("bulk-{i}"),
                bucket_ms + 5_000 + i % 1_000,
                "loading",
                &format!("bulk-{i}"),
            )
        })
        .collect();
    for chunk in prefill.chunks(200) {
        let sets = chunk.iter().map(|b| set(&client, b.clone()));
        for r in futures::future::join_all(sets).await {
            r?;
        }
    }
    assert!(
        now_ms() + 2_000 < bucket_ms,
        "the prefill took too long to set ahead of its bucket's load"
    );
    // The loader loads every 300 ms through now + 600 ms: the bucket is read when the
    // horizon enters it, about 600 ms before it starts. Set into it, one after
    // another, from 1 s before that until 500 ms after it starts.
    while now_ms() < bucket_ms - 1_600 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut late = Vec::new();
    let mut k = 0u64;
    while now_ms() < bucket_ms + 500 {
        let id = format!("late-{k}");
        set(
            &client,
            set_body(&id, bucket_ms + 4_000 + k, "loading", &id),
        )
        .await?;
        late.push(id);
        k += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let expected = prefill.len() + late.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let fired = loop {
        let fired = bodies(&server, "loading").await?;
        if fired.len() >= expected || tokio::time::Instant::now() > deadline {
            break fired;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let missing: Vec<&String> = late.iter().filter(|id| !fired.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} alarms set during the load never fired: {missing:?}",
        missing.len(),
        late.len()
    );
    assert_eq!(fired.len(), expected, "every alarm fired");
    assert!(fired.values().all(|&n| n == 1), "each once");
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// `set_many` sets each alarm as `set` does and answers each in its place: the good
/// ones are stored (one due at once fires into its process), a bad one and an id given
/// twice are refused on their own with the field named, and a request that does not
/// parse or holds too many alarms sets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_many_sets_each_alarm_on_its_own_and_refuses_only_the_bad_ones() -> Result<()> {
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let later = now_ms() + 3_600_000;
    // One stored before: the batch replaces it.
    set(&client, set_body("m-old", later, "batched", "before")).await?;
    let mut bad = set_body("m-bad", later, "batched", "x");
    bad["target"] = json!({"subject": "ts.schedule.batched"});
    let alarms = json!([
        set_body("m-now", now_ms(), "batched", "at once"),
        set_body("m-old", later + 60_000, "batched", "after"),
        bad,
        set_body("m-later", later, "batched", "later"),
        set_body("m-later", later + 1, "batched", "twice"),
    ]);
    let got = alarm(&client, "set_many", json!({ "alarms": alarms }))
        .await?
        .map_err(|e| anyhow::anyhow!("set_many refused: {e}"))?;
    let results = got["results"].as_array().context("results")?;
    assert_eq!(results.len(), 5, "{got}");
    let ids: Vec<&str> = results.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(
        ids,
        ["m-now", "m-old", "m-bad", "m-later", "m-later"],
        "{got}"
    );
    assert_eq!(results[0]["replaced"], false, "{got}");
    assert_eq!(results[1]["replaced"], true, "{got}");
    assert_eq!(results[3]["replaced"], false, "{got}");
    assert_eq!(results[2]["error"]["code"], "invalid_alarm", "{got}");
    assert!(
        results[2]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("target")),
        "{got}"
    );
    assert_eq!(results[4]["error"]["code"], "invalid_alarm", "{got}");
    // What was set is stored as set; the refused is not.
    assert_eq!(
        get_alarm(&client, "m-old").await?["alarm"]["due_ms"],
        later + 60_000
    );
    assert_eq!(
        get_alarm(&client, "m-later").await?["alarm"]["due_ms"],
        later
    );
    assert_eq!(
        alarm(&client, "get", json!({"id": "m-bad"})).await?,
        Err("not_found".to_string())
    );
    let fired = wait_status(&client, "m-now", "done", 20).await?;
    assert!(fired["status"]["slot"].is_u64(), "{fired}");
    assert_eq!(bodies(&server, "batched").await?.get("at once"), Some(&1));
    // Nothing of a request that does not parse, or that holds too many, is set.
    let mut broken = json!([set_body("m-none", later, "batched", "no")]);
    broken
        .as_array_mut()
        .context("array")?
        .push(json!({"id": "m-none-2", "due_ms": "soon", "target": {"process": "batched"}}));
    let refused = alarm(&client, "set_many", json!({ "alarms": broken })).await?;
    assert_eq!(refused, Err("malformed".to_string()));
    let many: Vec<Value> = (0..=alarm_loader::api::MAX_SET_MANY)
        .map(|i| json!({"id": format!("m-many-{i}"), "due_ms": later, "target": {"process": "batched"}}))
        .collect();
    let refused = alarm(&client, "set_many", json!({ "alarms": many })).await?;
    assert_eq!(refused, Err("invalid_alarm".to_string()));
    let refused = alarm(&client, "set_many", json!({ "alarms": [] })).await?;
    assert_eq!(refused, Err("invalid_alarm".to_string()));
    for id in ["m-none", "m-many-0"] {
        assert_eq!(
            alarm(&client, "get", json!({"id": id})).await?,
            Err("not_found".to_string()),
            "{id}"
        );
    }
    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}
