//! Queue keys (`Ts-Queue-Key`): a second request with the key of a job not yet
//! started is refused `queue_key_held` at once, and accepted once that job started;
//! keys are per process; a job delivered again never frees a newer request's hold;
//! the hold survives a scheduler restart; a stale pending hold is resolved from the
//! log; hostile header values are refused with a typed error, and requests without
//! the header never touch the bucket.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use harness::{NatsServer, Role};
use journal::client::{Client, Schedule};
use journal::subjects::{self, Subjects};
use protocol::queue::{hold_key, Hold};
use protocol::wire::{ErrorCode, Receipt};
use protocol::ProcessId;
use worker::job::Job;
use worker::queue::{Holds, Released};

use crate::support::{
    assert_refused, cli_ok, connect, connect_as, key_file, read_log, server, spawn_scheduler,
    test_key, wait_for_schedulers, wait_for_service,
};

fn keyed(key: &str) -> Schedule {
    Schedule {
        headers: vec![(subjects::QUEUE_KEY.into(), key.into())],
        ..Default::default()
    }
}

async fn schedule_key(
    client: &Client,
    process: &ProcessId,
    key: &str,
) -> Result<Receipt, journal::Error> {
    client
        .schedule(process, Bytes::from(format!("job {key}")), &keyed(key))
        .await
}

/// [`schedule_key`], retried while the scheduler is not there yet (no responders,
/// timeouts, `unavailable`): the first settled answer.
async fn settled(
    client: &Client,
    process: &ProcessId,
    key: &str,
) -> Result<Receipt, journal::Error> {
    let mut last = None;
    for _ in 0..100 {
        match schedule_key(client, process, key).await {
            Err(
                e @ (journal::Error::NoResponders(_)
                | journal::Error::Timeout(_)
                | journal::Error::Refused {
                    code: ErrorCode::Unavailable,
                    ..
                }),
            ) => last = Some(e),
            other => return other,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last.unwrap_or(journal::Error::Timeout("no answer".into())))
}

/// The queue-keys bucket, as the operator sees it.
async fn bucket(server: &NatsServer) -> Result<kv::Store> {
    let js = jetstream::new(connect_as(server, Role::Operator).await?);
    Ok(js.get_key_value("TS_QUEUE_KEYS").await?)
}

/// The hold of `key` in `process` once its slot is recorded (at most 10 s).
async fn assigned_hold(store: &kv::Store, process: &ProcessId, key: &str) -> Result<(Hold, u64)> {
    let name = hold_key(process, key);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(e) = store.entry(&name).await? {
            if e.operation == kv::Operation::Put {
                let h = Hold::decode(&e.value)?;
                if h.slot.is_some() {
                    return Ok((h, e.revision));
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no assigned hold for {key:?} in {process}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_worker(server: &NatsServer, group: &str, out: &Path) -> Result<harness::Process> {
    let mut cmd = std::process::Command::new(harness::workspace_bin("worker")?);
    cmd.arg("--group")
        .arg(group)
        .arg("--lease-ms")
        .arg("2000")
        .arg("--command")
        .arg("sh")
        .arg("-c")
        .arg(format!(
            "echo \"$TS_PROCESS:$TS_SLOT\" >> {}",
            out.display()
        ))
        .env("NATS_URL", server.url_as(Role::JobWorker))
        .env("TS_INTAKE_URL", server.url_as(Role::Worker))
        .env("RUST_LOG", "warn");
    Ok(harness::Process::spawn(cmd)?)
}

/// A paused group holds the job of the first request: the second with the same key is
/// refused (before and after the scheduler is restarted), other keys, the same key in
/// another process and requests without a key go through; the hold names the job's
/// slot; resumed, the job starts and the key is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_refused_while_its_job_waits_and_free_once_it_started() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(91))?;
    let mut sched = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let _w = spawn_worker(&server, "qk", &out)?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let op = server.url_as(Role::Operator);
    cli_ok(&op, &["queue", "pause", "qk"]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("qa")?;
    let other = ProcessId::new("qb")?;
    let first = schedule_key(&client, &p, "invoice-7").await?;
    assert_refused(
        schedule_key(&client, &p, "invoice-7").await,
        ErrorCode::QueueKeyHeld,
    );
    // Header names are matched whatever their case.
    let lower = Schedule {
        headers: vec![("ts-queue-key".into(), "invoice-7".into())],
        ..Default::default()
    };
    assert_refused(
        client.schedule(&p, Bytes::from("x"), &lower).await,
        ErrorCode::QueueKeyHeld,
    );
    // Another key, the same key in another process, no key: accepted.
    schedule_key(&client, &p, "invoice-8").await?;
    let theirs = schedule_key(&client, &other, "invoice-7").await?;
    client
        .schedule(&p, Bytes::from("plain"), &Schedule::default())
        .await?;
    // The log carries the key and the hold's token; the hold names the slot.
    let store = bucket(&server).await?;
    let (hold, _) = assigned_hold(&store, &p, "invoice-7").await?;
    assert_eq!(hold.slot, Some(first.slot));
    assert_eq!(hold.key, "invoice-7");
    let entries = read_log(server.url(), &p).await?;
    let e = entries
        .iter()
        .find(|e| e.slot == first.slot)
        .ok_or_else(|| anyhow::anyhow!("slot {} not in the log", first.slot))?;
    let header = |n: &str| {
        e.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header(subjects::QUEUE_KEY).as_deref(), Some("invoice-7"));
    assert_eq!(
        header(subjects::QUEUE_HOLD),
        hold.token.map(|t| t.to_string())
    );
    assert_ne!(theirs.slot, u64::MAX);

    // A new scheduler (the old one stopped) still refuses: the hold is in the bucket.
    let stopped =
        tokio::task::spawn_blocking(move || sched.terminate(Duration::from_secs(20))).await?;
    assert!(stopped, "the scheduler did not stop");
    let _sched2 = spawn_scheduler(&server, &key, &[])?;
    wait_for_schedulers(&nats, 1).await?;
    assert_refused(
        settled(&client, &p, "invoice-7").await,
        ErrorCode::QueueKeyHeld,
    );

    // Resumed: the job starts, its hold goes, the key is accepted again.
    cli_ok(&op, &["queue", "resume", "qk"]).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let again = loop {
        match schedule_key(&client, &p, "invoice-7").await {
            Ok(r) => break r,
            Err(journal::Error::Refused {
                code: ErrorCode::QueueKeyHeld,
                ..
            }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("the key never came free: {e}"),
        }
    };
    assert!(again.slot > first.slot);
    // The hold went as the job started: it runs (the handler writes once it ran).
    let want = format!("qa:{}", first.slot);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .any(|l| l == want)
    {
        if tokio::time::Instant::now() > deadline {
            bail!("the key came free but job {want} never ran");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The worker's release, as the job-worker user, against the real bucket: a job frees
/// its own hold; the same job delivered again after a newer request took the key
/// frees nothing; the newer job frees its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_delivered_again_never_frees_a_newer_requests_hold() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(92))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("qr")?;
    let store = bucket(&server).await?;

    let r1 = schedule_key(&client, &p, "k").await?;
    assigned_hold(&store, &p, "k").await?;
    let entries = read_log(server.url(), &p).await?;
    let job_of = |slot: u64| -> Result<Job> {
        let e = entries
            .iter()
            .find(|e| e.slot == slot)
            .ok_or_else(|| anyhow::anyhow!("slot {slot} not in the log"))?;
        Ok(Job::of_entry("g", &p, 1, e))
    };
    let j1 = job_of(r1.slot)?;
    let worker_js = jetstream::new(connect_as(&server, Role::JobWorker).await?);
    let subjects = Subjects::default();
    let holds = Holds::default();
    assert_eq!(
        holds.release(&worker_js, &subjects, &j1).await?,
        Released::Freed
    );

    let r2 = schedule_key(&client, &p, "k").await?;
    let (h2, _) = assigned_hold(&store, &p, "k").await?;
    assert_eq!(h2.slot, Some(r2.slot));
    // j1 again (a redelivery): not its hold.
    assert_eq!(
        holds.release(&worker_js, &subjects, &j1).await?,
        Released::NotOurs
    );
    assert_refused(
        schedule_key(&client, &p, "k").await,
        ErrorCode::QueueKeyHeld,
    );
    // A job without a key releases nothing and touches nothing.
    let plain = client
        .schedule(&p, Bytes::from("plain"), &Schedule::default())
        .await?;
    let entries = read_log(server.url(), &p).await?;
    let job_of = |slot: u64| -> Result<Job> {
        let e = entries
            .iter()
            .find(|e| e.slot == slot)
            .ok_or_else(|| anyhow::anyhow!("slot {slot} not in the log"))?;
        Ok(Job::of_entry("g", &p, 1, e))
    };
    assert_eq!(
        holds
            .release(&worker_js, &subjects, &job_of(plain.slot)?)
            .await?,
        Released::NoKey
    );
    assert_refused(
        schedule_key(&client, &p, "k").await,
        ErrorCode::QueueKeyHeld,
    );
    // j2 frees its own.
    assert_eq!(
        holds
            .release(&worker_js, &subjects, &job_of(r2.slot)?)
            .await?,
        Released::Freed
    );
    schedule_key(&client, &p, "k").await?;
    Ok(())
}

/// A pending hold older than the bound (its scheduler died between the create and
/// the answer) does not block its key forever: the next request resolves it from the
/// log — not there: removed, the request accepted; there: the hold names its slot and
/// the request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pending_hold_is_resolved_from_the_log() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(93))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("qs")?;
    let store = bucket(&server).await?;
    let long_ago = 1_000;

    // A pending hold whose request never reached the log.
    let orphan = Hold::pending("lost", long_ago, None);
    store
        .put(hold_key(&p, "lost"), orphan.encode()?.into())
        .await?;
    let r = schedule_key(&client, &p, "lost").await?;
    let (h, _) = assigned_hold(&store, &p, "lost").await?;
    assert_eq!(h.slot, Some(r.slot));

    // A pending hold whose request was written (the token is in the log).
    let written = schedule_key(&client, &p, "kept").await?;
    let (h, rev) = assigned_hold(&store, &p, "kept").await?;
    let mut pending = h.clone();
    pending.slot = None;
    pending.created_ms = long_ago;
    store
        .update(hold_key(&p, "kept"), pending.encode()?.into(), rev)
        .await?;
    assert_refused(
        schedule_key(&client, &p, "kept").await,
        ErrorCode::QueueKeyHeld,
    );
    let (h, _) = assigned_hold(&store, &p, "kept").await?;
    assert_eq!(h.slot, Some(written.slot));
    assert_eq!(h.token, pending.token);
    // A fresh pending hold (its request may still be on its way) is respected.
    store
        .put(
            hold_key(&p, "fresh"),
            Hold::pending("fresh", u64::MAX / 2, None).encode()?.into(),
        )
        .await?;
    assert_refused(
        schedule_key(&client, &p, "fresh").await,
        ErrorCode::QueueKeyHeld,
    );
    Ok(())
}

/// The last message stored for the hold of `key` in `process`, if any.
async fn hold_message(
    store: &kv::Store,
    process: &ProcessId,
    key: &str,
) -> Result<Option<jetstream::message::StreamMessage>> {
    let subject = format!("$KV.TS_QUEUE_KEYS.{}", hold_key(process, key));
    match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Releases the hold of `key` in `process` with `turnstile queue key --release`: the
/// headers of the purge marker left in its place.
async fn release_by_cli(
    server: &NatsServer,
    store: &kv::Store,
    process: &ProcessId,
    key: &str,
) -> Result<async_nats::HeaderMap> {
    let op = server.url_as(Role::Operator);
    cli_ok(&op, &["queue", "key", process.as_str(), key, "--release"]).await?;
    let marker = hold_message(store, process, key)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no marker after the release"))?;
    assert_eq!(
        marker.headers.get("KV-Operation").map(|v| v.as_str()),
        Some("PURGE")
    );
    Ok(marker.headers)
}

/// A released hold leaves one marker that the server removes after
/// `RELEASE_MARKER_TTL` (the bucket a scheduler creates allows per-message TTLs), so
/// the bucket keeps nothing of a key once it is released; the key is free over the
/// marker and over nothing. (Markers used to stay for good, one per key ever used.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_hold_leaves_a_marker_the_server_removes() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(96))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("qm")?;
    let store = bucket(&server).await?;
    assert!(store.stream.cached_info().config.allow_message_ttl);

    let first = settled(&client, &p, "k").await?;
    assigned_hold(&store, &p, "k").await?;
    let headers = release_by_cli(&server, &store, &p, "k").await?;
    let ttl = journal::setup::RELEASE_MARKER_TTL.as_secs().to_string();
    assert_eq!(
        headers.get("Nats-TTL").map(|v| v.as_str()),
        Some(ttl.as_str()),
        "{headers:?}"
    );

    // Free over the marker.
    let second = schedule_key(&client, &p, "k").await?;
    assert!(second.slot > first.slot);
    assigned_hold(&store, &p, "k").await?;
    assert_refused(
        schedule_key(&client, &p, "k").await,
        ErrorCode::QueueKeyHeld,
    );

    // The server's side of it, in a bucket made the same way with a marker TTL of one
    // second: the marker goes, no other takes its place, and the key is free over
    // nothing.
    let js = jetstream::new(connect_as(&server, Role::Operator).await?);
    let scratch = js
        .create_key_value(journal::setup::bucket_config(
            "TS_SCRATCH",
            "markers that expire",
            &journal::setup::LogOptions::default(),
            Some(Duration::from_secs(1)),
        ))
        .await?;
    let rev = scratch.create("k", Bytes::from_static(b"held")).await?;
    journal::setup::purge_released_within(&scratch, "k", Some(rev), Duration::from_secs(1)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = scratch.stream.clone().info().await?.state.messages;
        if left == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{left} messages left 15 s after a purge with a one-second marker");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    scratch.create("k", Bytes::from_static(b"again")).await?;
    Ok(())
}

/// A queue-keys bucket made without per-message TTLs (before turnstile asked for
/// them) is used as it is: a release leaves a marker without a TTL, and the key is
/// free over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_without_message_ttls_still_releases() -> Result<()> {
    let server = server()?;
    let js = jetstream::new(connect_as(&server, Role::Operator).await?);
    js.create_key_value(kv::Config {
        bucket: "TS_QUEUE_KEYS".into(),
        history: 5,
        ..Default::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(97))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("qo")?;
    let store = bucket(&server).await?;
    assert!(!store.stream.cached_info().config.allow_message_ttl);
    settled(&client, &p, "k").await?;
    assigned_hold(&store, &p, "k").await?;
    let headers = release_by_cli(&server, &store, &p, "k").await?;
    assert!(headers.get("Nats-TTL").is_none(), "{headers:?}");
    schedule_key(&client, &p, "k").await?;
    assigned_hold(&store, &p, "k").await?;
    Ok(())
}

/// Hostile values are refused `malformed` and take no hold; a client may not set the
/// hold header; requests without a key never write the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_queue_key_headers_are_refused_and_plain_requests_leave_the_bucket_alone(
) -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(94))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("qh")?;
    let js = jetstream::new(connect_as(&server, Role::Operator).await?);
    let messages = |js: jetstream::Context| async move {
        let mut s = js.get_stream("KV_TS_QUEUE_KEYS").await?;
        anyhow::Ok(s.info().await?.state.messages)
    };

    for _ in 0..20 {
        client
            .schedule(&p, Bytes::from("plain"), &Schedule::default())
            .await?;
    }
    assert_eq!(
        messages(js.clone()).await?,
        0,
        "a plain request touched the bucket"
    );

    let too_long = "k".repeat(protocol::queue::MAX_QUEUE_KEY + 1);
    let hostile: Vec<Vec<(String, String)>> = vec![
        vec![("Ts-Queue-Key".into(), String::new())],
        vec![("Ts-Queue-Key".into(), "   ".into())],
        vec![("Ts-Queue-Key".into(), too_long)],
        vec![("Ts-Queue-Key".into(), "a\u{7f}b".into())],
        vec![("Ts-Queue-Key".into(), "a\tb".into())],
        vec![
            ("Ts-Queue-Key".into(), "a".into()),
            ("TS-QUEUE-KEY".into(), "b".into()),
        ],
        vec![("Ts-Queue-Hold".into(), "1".into())],
        vec![
            ("Ts-Queue-Key".into(), "a".into()),
            ("Ts-Queue-Hold".into(), "1".into()),
        ],
    ];
    for headers in hostile {
        let opts = Schedule {
            headers: headers.clone(),
            ..Default::default()
        };
        match client.schedule(&p, Bytes::from("h"), &opts).await {
            Err(journal::Error::Refused {
                code: ErrorCode::Malformed,
                ..
            }) => {}
            other => bail!("{headers:?}: expected malformed, got {other:?}"),
        }
    }
    assert_eq!(
        messages(js.clone()).await?,
        0,
        "a refused request took a hold"
    );
    // The longest key, odd characters and all, is a key like any other.
    let longest = format!("{}.*> ü", "k".repeat(protocol::queue::MAX_QUEUE_KEY - 7));
    schedule_key(&client, &p, &longest).await?;
    assert_refused(
        schedule_key(&client, &p, &longest).await,
        ErrorCode::QueueKeyHeld,
    );
    Ok(())
}

/// A job cancelled while its queue is paused leaves the not-yet-started state
/// without starting: its key is free again, the queue still paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_before_it_started_frees_its_key() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(95))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let _w = spawn_worker(&server, "qc", &out)?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let op = server.url_as(Role::Operator);
    cli_ok(&op, &["queue", "pause", "qc"]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("qc")?;
    let first = schedule_key(&client, &p, "c").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_refused(
        schedule_key(&client, &p, "c").await,
        ErrorCode::QueueKeyHeld,
    );
    let slot = first.slot.to_string();
    cli_ok(&op, &["job", "cancel", "qc", "qc", &slot]).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match schedule_key(&client, &p, "c").await {
            Ok(_) => break,
            Err(journal::Error::Refused {
                code: ErrorCode::QueueKeyHeld,
                ..
            }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("the cancelled job's key never came free: {e}"),
        }
    }
    // Nothing ran: the queue is still paused and the first job was cancelled.
    assert_eq!(std::fs::read_to_string(&out).unwrap_or_default(), "");
    Ok(())
}

/// Raw protocol bytes no client library would send: every request with a bad
/// `Ts-Queue-Key` is answered with its typed error (a header block that is not valid
/// NATS: `malformed_request`), the service keeps answering, and only the good
/// request took a hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_hostile_queue_key_headers_get_typed_errors_and_take_no_hold() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(96))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let long = format!("NATS/1.0\r\nTs-Queue-Key: {}\r\n\r\n", "k".repeat(300));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not_utf8",
            b"NATS/1.0\r\nTs-Queue-Key: \xff\xfe\r\n\r\n".to_vec(),
            "malformed_request",
        ),
        (
            "empty",
            b"NATS/1.0\r\nTs-Queue-Key:\r\n\r\n".to_vec(),
            "malformed",
        ),
        (
            "twice",
            b"NATS/1.0\r\nts-queue-key: a\r\nTs-Queue-Key: b\r\n\r\n".to_vec(),
            "malformed",
        ),
        ("too_long", long.into_bytes(), "malformed"),
        (
            "hold_forged",
            b"NATS/1.0\r\nTs-Queue-Key: z\r\nTs-Queue-Hold: 1\r\n\r\n".to_vec(),
            "malformed",
        ),
        ("good", b"NATS/1.0\r\nTs-Queue-Key: ok\r\n\r\n".to_vec(), ""),
    ];
    let mut raw = crate::raw::RawClient::connect(server.url()).await?;
    raw.subscribe("_INBOX.qk.>", 1).await?;
    for (name, header, _) in &cases {
        raw.send(&crate::raw::publish(
            b"ts.schedule.qraw",
            Some(format!("_INBOX.qk.{name}").as_bytes()),
            Some(header),
            b"body",
        ))
        .await?;
    }
    let answers = raw.collect(cases.len(), Duration::from_secs(20)).await?;
    let got: std::collections::BTreeMap<String, String> = answers
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(&m.subject).replace("_INBOX.qk.", ""),
                m.header("Ts-Error").unwrap_or_default(),
            )
        })
        .collect();
    for (name, _, want) in &cases {
        assert_eq!(
            got.get(*name).map(String::as_str),
            Some(*want),
            "{name}: {got:?}"
        );
    }
    // One key in the bucket (its create and its slot's update are two messages).
    let store = bucket(&server).await?;
    let p = ProcessId::new("qraw")?;
    let keys: Vec<String> = futures::TryStreamExt::try_collect(store.keys().await?).await?;
    assert_eq!(
        keys,
        vec![hold_key(&p, "ok")],
        "only the good request holds a key"
    );
    // Still serving: the good key is held, another is free.
    let client = Client::new(nats.clone(), Subjects::default());
    assert_refused(
        schedule_key(&client, &p, "ok").await,
        ErrorCode::QueueKeyHeld,
    );
    schedule_key(&client, &p, "other").await?;
    Ok(())
}

/// A job with a queue key and an execution key held by another running job waits in
/// its instance's buffer, and waiting it has not started: its queue key stays held (a request with it is
/// refused) until the execution key frees and the job starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_parked_for_its_execution_key_keeps_its_queue_key_until_it_starts() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(96))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let o = out.display();
    let script = format!(
        "b=$(cat); j=\"$TS_PROCESS:$TS_SLOT\"; echo \"start $j\" >> {o}; \
         if [ \"$b\" = slow ]; then sleep 4; fi; echo \"end $j\" >> {o}"
    );
    let _w = crate::workers::spawn_worker(
        &server,
        "qx",
        &script,
        &["--exec-key-lease-ms", "3000", "--concurrency", "4"],
    )?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let instance = crate::workers::only_instance(&nats).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let exec = |queue: Option<&str>| Schedule {
        headers: std::iter::once(("Ts-Execution-Key".to_string(), "X".to_string()))
            .chain(queue.map(|q| (subjects::QUEUE_KEY.to_string(), q.to_string())))
            .collect(),
        ..Default::default()
    };
    let (p1, p2) = (ProcessId::new("qx1")?, ProcessId::new("qx2")?);
    let first = client
        .schedule(&p1, Bytes::from("slow"), &exec(None))
        .await?;
    let started = |job: String| {
        let out = out.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !crate::workers::lines(&out).contains(&format!("start {job}")) {
                if tokio::time::Instant::now() > deadline {
                    bail!("{job} never started: {:?}", crate::workers::lines(&out));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        }
    };
    started(format!("qx1:{}", first.slot)).await?;

    let second = client
        .schedule(&p2, Bytes::from("fast"), &exec(Some("k")))
        .await?;
    // The instance took it, and it waits (execution key X is held by the first).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (v, pending) = crate::workers::inspect(&nats, &instance).await?;
        // Waiting for its key: passed over in the buffer (the instance's watch saw X
        // taken) or parked after a create that found X held.
        let waiting = pending.contains(&format!("qx2:{}", second.slot));
        if waiting || v["counts"]["key_waits"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the second job was never parked: {v}; {:?}",
                crate::workers::lines(&out)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_refused(
        schedule_key(&client, &p2, "k").await,
        ErrorCode::QueueKeyHeld,
    );
    let end_first = format!("end qx1:{}", first.slot);
    assert!(
        !crate::workers::lines(&out).contains(&end_first),
        "the first job ended before the refusal: the test saw no parked job"
    );

    // The first ends, the second starts (after it) and its queue key is free again.
    started(format!("qx2:{}", second.slot)).await?;
    let seen = crate::workers::lines(&out);
    let at = |l: &str| seen.iter().position(|x| x == l);
    assert!(
        at(&end_first) < at(&format!("start qx2:{}", second.slot)),
        "the second job started before the first ended: {seen:?}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match schedule_key(&client, &p2, "k").await {
            Ok(r) => {
                assert!(r.slot > second.slot);
                break;
            }
            Err(journal::Error::Refused {
                code: ErrorCode::QueueKeyHeld,
                ..
            }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("the started job's queue key never came free: {e}"),
        }
    }
    Ok(())
}

/// Two scheduler replicas race on queue keys: 40 requests with one key at once, and
/// 10 keys × 6 requests at once, spread over both replicas by the queue group: for
/// each key exactly one request is written, every other one is refused
/// `queue_key_held`, and the bucket's hold names the one written slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_on_one_queue_key_write_it_once() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(97))?;
    let _a = spawn_scheduler(&server, &key, &[])?;
    let _b = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 2).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("qr")?;
    let store = bucket(&server).await?;

    let rounds: [(&str, Vec<String>); 2] = [
        ("one key, 40 requests", vec!["hot".to_string(); 40]),
        (
            "10 keys, 6 requests each",
            (0..60).map(|i| format!("k{}", i % 10)).collect(),
        ),
    ];
    for (what, keys) in rounds {
        let answers = futures::future::join_all(keys.iter().map(|k| {
            let (client, p) = (client.clone(), p.clone());
            async move { (k.clone(), schedule_key(&client, &p, k).await) }
        }))
        .await;
        let mut written: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for (k, answer) in answers {
            match answer {
                Ok(r) => written.entry(k).or_default().push(r.slot),
                Err(journal::Error::Refused {
                    code: ErrorCode::QueueKeyHeld,
                    ..
                }) => {}
                Err(e) => bail!("{what}: key {k}: {e}"),
            }
        }
        let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
        assert_eq!(written.len(), distinct.len(), "{what}: {written:?}");
        for (k, slots) in &written {
            assert_eq!(slots.len(), 1, "{what}: key {k} written at {slots:?}");
            let (hold, _) = assigned_hold(&store, &p, k).await?;
            assert_eq!(hold.slot, Some(slots[0]), "{what}: key {k}");
        }
    }
    // What was written is exactly the receipts: 11 entries in the process's log.
    assert_eq!(read_log(server.url(), &p).await?.len(), 11);
    // Both replicas raced: each refused some of the 89 losers.
    let refused: Vec<u64> = service::ask_all(
        &nats,
        "STATS",
        "turnstile-scheduler",
        Duration::from_millis(500),
    )
    .await?
    .iter()
    .map(|stats| {
        stats["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|e| e["data"]["queue_key_held"].as_u64())
            .unwrap_or(0)
    })
    .collect();
    assert_eq!(refused.len(), 2, "two replicas answered STATS: {refused:?}");
    assert_eq!(refused.iter().sum::<u64>(), 89, "{refused:?}");
    assert!(
        refused.iter().all(|&n| n > 0),
        "one replica took no part in the race: {refused:?}"
    );
    Ok(())
}
