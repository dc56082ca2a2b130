//! The log defends itself: foreign messages on a log subject (replays, forgeries,
//! garbage, another process's run, a stranger's run) give no slot twice, hide no
//! assignment, never stall the process, and are reported by the continuous audit
//! (a fault event naming the stream sequence) and by `verify`. Requests whose reply
//! subject points into our own space are answered nowhere and write nothing.

use std::time::Duration;

use anyhow::{bail, Result};
use bytes::Bytes;
use futures::StreamExt;

use harness::{NatsServer, Role};
use journal::client::{Client, Schedule};
use journal::subjects::Subjects;
use protocol::keys::Keypair;
use protocol::wire::{FaultEvent, Mode, ProcessConfig, Run};
use protocol::ProcessId;
use scheduler::Config;

use crate::support::*;

/// What a test appends to P's subject, given P's runs so far (stream sequence, run).
type Forge = fn(&[(u64, Run)], &Keypair) -> (async_nats::HeaderMap, Bytes);

fn run_headers(run: &Run) -> async_nats::HeaderMap {
    journal::reader::RunMeta::headers_of(run)
}

fn replay(log: &[(u64, Run)], _: &Keypair) -> (async_nats::HeaderMap, Bytes) {
    let run = &log[3].1;
    (run_headers(run), run.encode().expect("encodes").into())
}

fn forged(log: &[(u64, Run)], _: &Keypair) -> (async_nats::HeaderMap, Bytes) {
    // The head run with its body changed and every hash recomputed; the old seal kept.
    let (seq, head) = log.last().expect("a head");
    let mut run = head.clone();
    run.prev_seq = *seq;
    run.first_slot = head.last_slot() + 1;
    let mut prev = head.head();
    for (i, e) in run.entries.iter_mut().enumerate() {
        e.slot = run.first_slot + i as u64;
        e.body = b"forged".to_vec();
        e.prev_hash = prev;
        e.chain_hash = e.recompute_chain_hash(&run.process);
        prev = e.chain_hash;
    }
    (run_headers(&run), run.encode().expect("encodes").into())
}

fn garbage(log: &[(u64, Run)], _: &Keypair) -> (async_nats::HeaderMap, Bytes) {
    // Plausible headers claiming a huge head; a body that is no run at all.
    let mut h = run_headers(&log.last().expect("a head").1);
    h.insert(journal::subjects::FIRST_SLOT, "1000");
    h.insert(journal::subjects::LAST_SLOT, "999999");
    (h, Bytes::from_static(b"\x93\x01\x02garbage"))
}

fn other_process(_: &[(u64, Run)], _: &Keypair) -> (async_nats::HeaderMap, Bytes) {
    // Filled in by the test (a genuine run of Q); placeholder never used.
    (async_nats::HeaderMap::new(), Bytes::new())
}

fn stranger(log: &[(u64, Run)], _: &Keypair) -> (async_nats::HeaderMap, Bytes) {
    // A well-formed continuation, signed by a key nobody trusts.
    let (seq, head) = log.last().expect("a head");
    let outsider = Keypair::from_seed([0x66; 32]);
    let p = ProcessId::new(head.process.clone()).expect("valid");
    let point = scheduler::core::Head::after(head, *seq);
    let (mut run, tree) = scheduler::core::build_run(
        &p,
        &point,
        vec![scheduler::core::NewMessage {
            message_id: "intruder".into(),
            headers: vec![],
            body: b"not from us".to_vec(),
        }],
        head.entries[0].timestamp_ms + 1,
    );
    let digest = protocol::seal::run_digest(&run.statement_for(&tree));
    run.seal = protocol::seal::seal(&[digest], &[&outsider]).remove(0);
    (run_headers(&run), run.encode().expect("encodes").into())
}

/// Every run of `process` on the subject, in stream order, as stored (no judging).
async fn raw_runs(server: &NatsServer, process: &ProcessId) -> Result<Vec<(u64, Run)>> {
    let js = async_nats::jetstream::new(connect_as(server, Role::Operator).await?);
    let reader = journal::reader::LogReader::open(js, Subjects::default()).await?;
    let tail = reader
        .last_message(process)
        .await?
        .map(|m| m.seq)
        .unwrap_or(0);
    let mut msgs = reader.messages(process, 1, Some(tail)).await?;
    let mut out = Vec::new();
    while let Some(m) = msgs.next().await {
        let m = m?;
        if let Ok(run) = m.decode() {
            out.push((m.seq, run));
        }
    }
    Ok(out)
}

/// Waits for a fault event of `process` at stream sequence `seq`.
async fn expect_fault(
    events: &mut async_nats::Subscriber,
    process: &str,
    seq: u64,
) -> Result<FaultEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, events.next()).await else {
            bail!("no fault event for {process} at stream sequence {seq}");
        };
        let e: FaultEvent = serde_json::from_slice(&m.payload)?;
        if e.process == process && e.seq == seq {
            return Ok(e);
        }
    }
}

async fn schedule_n(client: &Client, p: &ProcessId, tag: &str, n: usize) -> Result<Vec<u64>> {
    let mut slots = Vec::new();
    for i in 0..n {
        let r = client
            .schedule(p, Bytes::from(format!("{tag} {i}")), &Schedule::default())
            .await?;
        slots.push(r.slot);
    }
    Ok(slots)
}

/// The scenario every foreign message goes through: a scheduler serving P (and
/// traffic on Q), the foreign message appended after P's head, then: the audit's
/// fault event names its stream sequence; P goes on at the next slot (no slot twice,
/// no gap), also after a restart of the scheduler (a cold load past a foreign tail);
/// verify names exactly that message; Q is untouched.
async fn foreign_after_head(name: &str, forge: Forge, expected_code: &str) -> Result<()> {
    let server = server()?;
    let key = test_key(21);
    let s = InProcess::start(&server, Config::default(), vec![test_key(21)]).await?;
    let client_nats = connect(server.url()).await?;
    wait_for_schedulers(&client_nats, 1).await?;
    let mut events = client_nats.subscribe("ts.events.fault").await?;
    client_nats.flush().await?;
    let client = Client::new(client_nats.clone(), Subjects::default());
    let p = ProcessId::new("victim")?;
    let q = ProcessId::new("bystander")?;
    assert_eq!(
        schedule_n(&client, &p, "before", 8).await?,
        (0..8).collect::<Vec<_>>()
    );
    let bystander = tokio::spawn({
        let client = client.clone();
        let q = q.clone();
        async move { schedule_n(&client, &q, "q", 30).await }
    });

    // The attacker: anyone with publish rights on the log (the operator here).
    let operator = connect_as(&server, Role::Operator).await?;
    let log = raw_runs(&server, &p).await?;
    let (headers, body) = if expected_code == "wrong_process" {
        let other = ProcessId::new("other")?;
        client
            .schedule(&other, Bytes::from("o"), &Schedule::default())
            .await?;
        let other_runs = raw_runs(&server, &other).await?;
        let run = &other_runs.first().expect("other has a run").1;
        (run_headers(run), run.encode()?.into())
    } else {
        forge(&log, &key)
    };
    let js = async_nats::jetstream::new(operator.clone());
    let ack = js
        .publish_with_headers("ts.log.victim", headers, body)
        .await?
        .await?;
    let foreign_seq = ack.sequence;

    let event = expect_fault(&mut events, "victim", foreign_seq).await?;
    assert_eq!(event.code, expected_code, "{name}: {event:?}");

    assert_eq!(
        schedule_n(&client, &p, "after", 4).await?,
        (8..12).collect::<Vec<_>>(),
        "{name}: P goes on at the next slot"
    );
    let q_slots = bystander.await??;
    assert_eq!(q_slots, (0..30).collect::<Vec<_>>(), "{name}: Q untouched");
    // A new scheduler loads P's head past whatever the tail is now.
    s.stop().await?;
    js.publish_with_headers(
        "ts.log.victim",
        {
            let (h, _) = forge(&raw_runs(&server, &p).await?, &key);
            h
        },
        Bytes::from_static(b"tail garbage"),
    )
    .await?
    .await?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(21)]).await?;
    wait_for_schedulers(&client_nats, 1).await?;
    assert_eq!(
        schedule_n(&client, &p, "restarted", 3).await?,
        (12..15).collect::<Vec<_>>(),
        "{name}: after a restart on a foreign tail"
    );

    let report = verify(server.url(), &p, &[&key]).await?;
    let codes: Vec<(u64, &str)> = report
        .faults
        .iter()
        .map(|f| (f.seq, f.kind.code()))
        .collect();
    assert_eq!(
        codes.first(),
        Some(&(foreign_seq, expected_code)),
        "{name}: {codes:?}"
    );
    assert_eq!(
        codes.len(),
        2,
        "{name}: the foreign message and the tail garbage: {codes:?}"
    );
    assert_eq!(codes[1].1, "undecodable", "{name}");
    assert_eq!((report.checked, report.last_good), (15, Some(14)), "{name}");
    let entries = read_log(server.url(), &p).await?;
    let slots: Vec<u64> = entries.iter().map(|e| e.slot).collect();
    assert_eq!(
        slots,
        (0..15).collect::<Vec<_>>(),
        "{name}: no slot twice, no gap"
    );
    assert!(verify(server.url(), &q, &[&key]).await?.faults.is_empty());
    s.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_signed_run_after_the_head_gives_no_slot_twice() -> Result<()> {
    foreign_after_head("replay", replay, "replayed").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_run_with_recomputed_hashes_is_foreign() -> Result<()> {
    foreign_after_head("forged", forged, "bad_signature").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plausible_headers_on_a_garbage_body_are_foreign() -> Result<()> {
    foreign_after_head("garbage", garbage, "undecodable").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_genuine_run_of_another_process_is_foreign() -> Result<()> {
    foreign_after_head("other process", other_process, "wrong_process").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_signed_by_a_stranger_is_foreign() -> Result<()> {
    foreign_after_head("stranger", stranger, "untrusted_key").await
}

/// Requests whose reply subject points into the log, a bucket, the JetStream API or
/// the services API get no answer at all, and nothing is written there; the
/// services API's own handlers refuse them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_into_our_own_space_are_never_sent() -> Result<()> {
    let server = server()?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(22)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator.clone());
    // C is disabled by its operator.
    let processes = journal::setup::open_bucket(&js, "TS_PROCESSES").await?;
    let disabled = ProcessConfig {
        mode: Some(Mode::Disabled),
        keys: vec![],
    };
    processes.put("c", disabled.encode()?.into()).await?;
    let v = ProcessId::new("v")?;
    client
        .schedule(&v, Bytes::from("v0"), &Schedule::default())
        .await?;

    let hostile = [
        ("ts.schedule.b", "ts.log.v"),
        ("ts.slot.b", "$KV.TS_PROCESSES.c"),
        ("ts.range.b", "$JS.API.STREAM.DELETE.TS_LOG"),
        ("ts.keys", "$KV.TS_KEYS.evil"),
        ("ts.schedule.b", "ts.schedule.c"),
        ("$SRV.PING", "ts.log.v"),
        ("$SRV.INFO.turnstile-scheduler", "$KV.TS_PROCESSES.c"),
        ("$SRV.STATS", "$SYS.REQ.SERVER.PING"),
    ];
    // The attacker watches where the answers would land.
    let mut landed = operator.subscribe("ts.log.>").await?;
    let mut kv_landed = operator.subscribe("$KV.>").await?;
    settled(&operator).await?;
    for (subject, reply) in hostile {
        nats.publish_with_reply(subject, reply, Bytes::from_static(b"\x80"))
            .await?;
    }
    nats.flush().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), landed.next())
            .await
            .is_err(),
        "nothing answered onto a log subject"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), kv_landed.next())
            .await
            .is_err(),
        "nothing answered into a bucket"
    );
    // V's log holds its one run, C is still disabled, B got nothing, the stream lives.
    assert_eq!(read_log(server.url(), &v).await?.len(), 1);
    let c = processes.get("c").await?.expect("c's settings");
    assert_eq!(ProcessConfig::decode(&c)?, disabled);
    assert!(read_log(server.url(), &ProcessId::new("b")?)
        .await?
        .is_empty());
    js.get_stream("TS_LOG").await?;
    // V goes on; the refusals were counted.
    let r = client
        .schedule(&v, Bytes::from("v1"), &Schedule::default())
        .await?;
    assert_eq!(r.slot, 1);
    let stats: serde_json::Value = serde_json::from_slice(
        &nats
            .request("$SRV.STATS.turnstile-scheduler", Bytes::new())
            .await?
            .payload,
    )?;
    assert_eq!(stats["replies_refused"], 8, "{stats}");
    s.stop().await?;
    Ok(())
}

/// A stored message whose header block no client library parses (published raw by
/// someone with write rights) must not make the process unreadable: readers take the
/// body and judge it; it is foreign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_with_unparsable_headers_is_foreign_not_fatal() -> Result<()> {
    let server = server()?;
    let key = test_key(23);
    let s = InProcess::start(&server, Config::default(), vec![test_key(23)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let mut events = nats.subscribe("ts.events.fault").await?;
    nats.flush().await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("victim")?;
    assert_eq!(schedule_n(&client, &p, "before", 3).await?, vec![0, 1, 2]);

    let mut raw = crate::raw::RawClient::connect(&server.url_as(Role::Operator)).await?;
    raw.send(&crate::raw::publish(
        b"ts.log.victim",
        None,
        Some(b"NATS/1.0\r\nTs-Last-Slot: \xff\xfe\r\nno colon\r\n\r\n"),
        b"\x81\xa1v\x02",
    ))
    .await?;
    raw.flush().await?;
    let tail = raw_runs(&server, &p)
        .await?
        .last()
        .map(|(seq, _)| *seq)
        .unwrap_or(0);
    let event = expect_fault(&mut events, "victim", tail + 1).await?;
    assert_eq!(event.code, "undecodable", "{event:?}");
    assert_eq!(schedule_n(&client, &p, "after", 2).await?, vec![3, 4]);
    s.stop().await?;
    // Put it at the tail again, then a cold load.
    raw.send(&crate::raw::publish(
        b"ts.log.victim",
        None,
        Some(b"NATS/2.0\r\n\r\n"),
        b"x",
    ))
    .await?;
    raw.flush().await?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(23)]).await?;
    wait_for_schedulers(&nats, 1).await?;
    assert_eq!(schedule_n(&client, &p, "restarted", 2).await?, vec![5, 6]);
    let report = verify(server.url(), &p, &[&key]).await?;
    let codes: Vec<&str> = report.faults.iter().map(|f| f.kind.code()).collect();
    assert_eq!(codes, vec!["undecodable", "undecodable"]);
    assert_eq!(report.checked, 7);
    s.stop().await?;
    Ok(())
}

/// The disk case: a byte flipped inside a stored run while the server is down makes
/// JetStream drop that run without a word. The scheduler's re-check after it
/// reconnects raises the fault (`lost`), and the process goes on without giving the
/// lost slots again; verify names the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_damaged_on_disk_is_reported_after_the_reconnect_and_its_slots_not_reused(
) -> Result<()> {
    let mut server = server()?;
    let key = test_key(24);
    let s = InProcess::start(&server, Config::default(), vec![test_key(24)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client =
        Client::new(nats.clone(), Subjects::default()).with_timeout(Duration::from_secs(30));
    let p = ProcessId::new("disk")?;
    for i in 0..10 {
        client
            .schedule(
                &p,
                Bytes::from(format!("payload-{i:02}")),
                &Schedule::default(),
            )
            .await?;
    }
    let runs = raw_runs(&server, &p).await?;
    let (last_seq, _) = *runs.last().expect("runs");

    // Behind everyone's back: stop the server, flip one byte of the last run's body.
    server.stop();
    let changed = patch_files(&server.store_dir(), b"payload-09", b"Payload-09")?;
    assert!(changed >= 1, "the last run's body is in the store");
    server.restart_in_place()?;

    // The scheduler reconnects by itself and re-checks its live process.
    let mut events = connect(server.url())
        .await?
        .subscribe("ts.events.fault")
        .await?;
    let event = expect_fault(&mut events, "disk", last_seq).await?;
    assert_eq!(event.code, "lost", "{event:?}");
    // The lost slot 9 is never given again.
    let r = client
        .schedule(&p, Bytes::from("after"), &Schedule::default())
        .await?;
    assert_eq!(r.slot, 10);
    let report = verify(server.url(), &p, &[&key]).await?;
    let codes: Vec<&str> = report.faults.iter().map(|f| f.kind.code()).collect();
    assert_eq!(codes, vec!["lost", "gap"], "{:?}", report.faults);
    assert_eq!(report.faults[1].slot, 9);
    s.stop().await?;
    Ok(())
}
