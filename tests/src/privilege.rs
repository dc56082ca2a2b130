//! Least privilege with the deployment's own server configuration (deploy/nats.conf,
//! deploy/accounts.conf): a client without credentials schedules and reads but cannot
//! write the log, the buckets or the streams; the scheduler's intake publishes nothing
//! but replies, and no reply of it reaches the log whatever reply subject a client
//! chose; its replies user publishes answers and nothing in our space; only the
//! alarm-loader's user writes the alarm stream; the operator changes settings.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use harness::{NatsServer, Role};
use journal::client::{Client, Schedule};
use journal::subjects::Subjects;
use protocol::wire::{Mode, ProcessConfig};
use protocol::ProcessId;
use scheduler::Config;

use crate::support::*;

/// Connects to `url` (credentials inside, if any) and returns the server's errors for
/// this connection (permissions violations) as they come.
async fn connect_watching(
    url: &str,
) -> Result<(async_nats::Client, mpsc::UnboundedReceiver<String>)> {
    let (url, credentials) = harness::split_url_credentials(url);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut options = async_nats::ConnectOptions::new().event_callback(move |event| {
        let tx = tx.clone();
        async move {
            if let async_nats::Event::ServerError(e) = event {
                let _ = tx.send(e.to_string());
            }
        }
    });
    if let Some((user, password)) = credentials {
        options = options.user_and_password(user, password);
    }
    Ok((options.connect(url).await?, rx))
}

/// How long a test waits for something that must happen (a delivery, the server's
/// violation error). Each wait returns as soon as it happens; the bound is generous
/// because CI runs many servers on 2 cores (a 5 s wait for a plain delivery once
/// ran out there, while other tests saw 10 s JetStream timeouts).
const MUST_HAPPEN: Duration = Duration::from_secs(20);

/// Waits for the server's permissions violation for a publish to `subject`.
async fn expect_violation(
    errors: &mut mpsc::UnboundedReceiver<String>,
    subject: &str,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + MUST_HAPPEN;
    loop {
        match tokio::time::timeout_at(deadline, errors.recv()).await {
            Ok(Some(e)) if e.contains("Permissions Violation") && e.contains(subject) => {
                return Ok(())
            }
            Ok(Some(_)) => {}
            _ => bail!("no permissions violation for a publish to {subject}"),
        }
    }
}

/// A JetStream context with a short timeout, for requests the server refuses: a
/// refused request is never answered, so the timeout is how it ends.
fn js_refused(nats: &async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(nats.clone())
}

/// A JetStream context for requests that must be answered (reads, the operator's
/// writes): bounded by [`MUST_HAPPEN`], since a loaded CI machine can take longer
/// than a second to answer one (a 1 s bound here failed a CI run).
fn js_of(nats: &async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(MUST_HAPPEN)
        .build(nats.clone())
}

async fn log_messages(js: &jetstream::Context) -> Result<u64> {
    Ok(js.get_stream("TS_LOG").await?.info().await?.state.messages)
}

fn disabled() -> Result<Bytes> {
    Ok(ProcessConfig {
        mode: Some(Mode::Disabled),
        keys: vec![],
    }
    .encode()?
    .into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_credentials_schedules_and_reads_but_cannot_write() -> Result<()> {
    let server = server()?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(20)]).await?;
    let (nats, mut errors) = connect_watching(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;

    // (a) Scheduling and every read work without credentials.
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("p")?;
    for i in 0..3 {
        let r = client
            .schedule(&p, Bytes::from(format!("m{i}")), &Schedule::default())
            .await?;
        assert_eq!(r.slot, i);
    }
    assert_eq!(client.slot(&p).await?.next_slot, 3);
    assert_eq!(read_log(server.url(), &p).await?.len(), 3);
    assert_eq!(
        verify(server.url(), &p, &[&test_key(20)]).await?.faults,
        vec![]
    );
    let js = js_of(&nats);
    let refused = js_refused(&nats);
    let before = log_messages(&js).await?;

    // (b) No publish on the log: neither plain nor through JetStream.
    nats.publish("ts.log.p", Bytes::from("forged")).await?;
    nats.flush().await?;
    expect_violation(&mut errors, "ts.log.p").await?;
    let ack = refused.publish("ts.log.p", Bytes::from("forged")).await?;
    assert!(
        ack.await.is_err(),
        "a JetStream publish on the log was acknowledged"
    );
    expect_violation(&mut errors, "ts.log.p").await?;
    assert_eq!(log_messages(&js).await?, before, "the log changed");

    // (c) No stream administration, no bucket writes; reading the bucket works.
    assert!(refused.delete_stream("TS_LOG").await.is_err());
    expect_violation(&mut errors, "$JS.API.STREAM.DELETE.TS_LOG").await?;
    assert!(refused
        .get_stream_no_info("TS_LOG")
        .await?
        .purge()
        .await
        .is_err());
    expect_violation(&mut errors, "$JS.API.STREAM.PURGE.TS_LOG").await?;
    // A bucket put is a JetStream publish on the key's subject.
    let put = refused.publish("$KV.TS_PROCESSES.p", disabled()?).await?;
    assert!(put.await.is_err(), "a settings write was acknowledged");
    expect_violation(&mut errors, "$KV.TS_PROCESSES.p").await?;
    let settings = js.get_key_value("TS_PROCESSES").await?;
    assert_eq!(settings.get("p").await?, None);
    assert_eq!(log_messages(&js).await?, before, "the log changed");
    let r = client
        .schedule(&p, Bytes::from("still open"), &Schedule::default())
        .await?;
    assert_eq!(r.slot, 3);
    s.stop().await?;
    Ok(())
}

/// A responder with the intake's identity that answers every request, wherever its
/// reply subject points (the scheduler itself refuses such replies; this checks that
/// the server's accounts hold even for a responder that does not).
async fn naive_intake(server: &NatsServer) -> Result<tokio::task::JoinHandle<()>> {
    let nats = connect_as(server, Role::SchedulerIntake).await?;
    let mut sub = nats.subscribe("ts.slot.>").await?;
    nats.flush().await?;
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                let _ = nats.publish(reply, Bytes::from("an answer")).await;
                let _ = nats.flush().await;
            }
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intake_publishes_only_replies_and_no_reply_reaches_the_log() -> Result<()> {
    let server = server()?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(21)]).await?;
    let client_nats = connect(server.url()).await?;
    wait_for_schedulers(&client_nats, 1).await?;
    let p = ProcessId::new("p")?;
    Client::new(client_nats.clone(), Subjects::default())
        .schedule(&p, Bytes::from("one"), &Schedule::default())
        .await?;
    let operator = js_of(&connect_as(&server, Role::Operator).await?);
    let before = log_messages(&operator).await?;

    // On its own, the intake publishes nowhere.
    let (intake, mut errors) = connect_watching(&server.url_as(Role::SchedulerIntake)).await?;
    intake.publish("ts.log.p", Bytes::from("forged")).await?;
    intake.flush().await?;
    expect_violation(&mut errors, "ts.log.p").await?;
    intake.publish("ts.events.x", Bytes::from("forged")).await?;
    intake.flush().await?;
    expect_violation(&mut errors, "ts.events.x").await?;

    // A client aims a request's reply at the log, a bucket and the JetStream API: the
    // answer lands in the client's account, where none of them exist.
    let responder = naive_intake(&server).await?;
    // Its reply to a normal request does arrive.
    let answer = client_nats
        .request("ts.slot.p", Bytes::new())
        .await
        .context("the naive responder answers")?;
    assert!(!answer.payload.is_empty());
    for reply in [
        "ts.log.p",
        "$KV.TS_PROCESSES.p",
        "$JS.API.STREAM.DELETE.TS_LOG",
        "$JS.API.STREAM.PURGE.TS_LOG",
    ] {
        client_nats
            .publish_with_reply("ts.slot.p", reply, Bytes::new())
            .await?;
    }
    client_nats.flush().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    responder.abort();
    assert_eq!(
        log_messages(&operator).await?,
        before,
        "a reply reached the log"
    );
    let settings = operator.get_key_value("TS_PROCESSES").await?;
    assert_eq!(settings.get("p").await?, None, "a reply reached the bucket");
    s.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_changes_settings_and_the_scheduler_cannot_delete_the_log() -> Result<()> {
    let server = server()?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(22)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("p")?;
    client
        .schedule(&p, Bytes::from("open"), &Schedule::default())
        .await?;

    // The CLI without credentials is refused a settings change; as the operator (its
    // password in NATS_URL) it succeeds.
    let cli = |url: String| {
        let mut cmd = std::process::Command::new(harness::workspace_bin("turnstile")?);
        cmd.args(["process", "set", "p", "--mode", "disabled"])
            .env("NATS_URL", url)
            .env_remove("NATS_CREDS");
        Ok::<_, anyhow::Error>(cmd.output()?)
    };
    let anonymous = cli(server.url().to_string())?;
    assert!(
        !anonymous.status.success(),
        "an anonymous client changed settings"
    );
    let operator = cli(server.url_as(Role::Operator))?;
    assert!(
        operator.status.success(),
        "{}",
        String::from_utf8_lossy(&operator.stderr)
    );
    let settings = js_of(&nats).get_key_value("TS_PROCESSES").await?;
    let stored = settings
        .get("p")
        .await?
        .context("the operator's settings")?;
    assert_eq!(ProcessConfig::decode(&stored)?.mode, Some(Mode::Disabled));

    // The operator's KV client works too.
    let admin = js_of(&connect_as(&server, Role::Operator).await?);
    admin
        .get_key_value("TS_PROCESSES")
        .await?
        .put("q", disabled()?)
        .await?;

    // The scheduler's own user may write the log but never remove it.
    let (core, mut errors) = connect_watching(&server.url_as(Role::Scheduler)).await?;
    assert!(js_refused(&core).delete_stream("TS_LOG").await.is_err());
    expect_violation(&mut errors, "$JS.API.STREAM.DELETE.TS_LOG").await?;
    assert!(admin.get_stream("TS_LOG").await.is_ok());
    s.stop().await?;
    Ok(())
}

/// The alarm stream and the loaders' leases are written by the `alarm-loader` user
/// alone (and the operator): no client, worker, intake or replies user, nor the
/// scheduler's core user, may publish on `ts.alarms.>`, purge the stream or delete
/// it; none of them but the scheduler's core user (the ownership bucket is shared by
/// groups) may write a lease. The loader's own user can write there: the check is real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_alarm_loader_writes_the_alarm_stream_and_its_leases() -> Result<()> {
    let server = server()?;
    let mut loader = crate::alarms::spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    crate::alarms::wait_for_loaders(&client, 1).await?;
    crate::alarms::set(
        &client,
        serde_json::json!({"id": "kept", "due_ms": crate::alarms::now_ms() + 3_600_000,
                           "target": {"process": "p"}}),
    )
    .await?;
    let admin = js_of(&connect_as(&server, Role::Operator).await?);
    let alarms = admin.get_stream("TS_ALARMS").await?;
    let leases = admin.get_key_value("TS_OWNERSHIP").await?;
    let lease = "alarm-loader.p.0";
    // The loader holds every partition once it has settled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while leases.entry(lease).await?.is_none() {
        if tokio::time::Instant::now() > deadline {
            bail!("no lease of partition 0");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Everything published on the stream's subjects and the leases, as it happens
    // (the loader itself writes there all along: checkpoints, renewals).
    let watcher = connect_as(&server, Role::Operator).await?;
    let mut published = watcher.subscribe("ts.alarms.>").await?;
    let mut leased = watcher.subscribe("$KV.TS_OWNERSHIP.>").await?;
    settled(&watcher).await?;

    for role in [
        Role::Client,
        Role::Worker,
        Role::AlarmIntake,
        Role::SchedulerIntake,
        Role::SchedulerReplies,
        Role::Scheduler,
        Role::JobWorker,
    ] {
        let (nats, mut errors) = connect_watching(&server.url_as(role)).await?;
        nats.publish("ts.alarms.rec.kept", Bytes::from("forged"))
            .await?;
        nats.flush().await?;
        expect_violation(&mut errors, "ts.alarms.rec.kept")
            .await
            .with_context(|| format!("{role:?}"))?;
        let ack = js_refused(&nats)
            .publish("ts.alarms.due.0.1.forged", Bytes::from("{}"))
            .await?;
        assert!(
            ack.await.is_err(),
            "{role:?}: a JetStream publish was acknowledged"
        );
        expect_violation(&mut errors, "ts.alarms.due.0.1.forged")
            .await
            .with_context(|| format!("{role:?}"))?;
        for api in [
            "$JS.API.STREAM.PURGE.TS_ALARMS",
            "$JS.API.STREAM.DELETE.TS_ALARMS",
        ] {
            nats.publish(api, Bytes::from("{}")).await?;
            nats.flush().await?;
            expect_violation(&mut errors, api)
                .await
                .with_context(|| format!("{role:?}"))?;
        }
        // The scheduler and the workers hold leases of their own in the bucket.
        if role != Role::Scheduler && role != Role::JobWorker {
            let key = format!("$KV.TS_OWNERSHIP.{lease}");
            nats.publish(key.clone(), Bytes::from("forged")).await?;
            nats.flush().await?;
            expect_violation(&mut errors, &key)
                .await
                .with_context(|| format!("{role:?}"))?;
        }
    }
    watcher.flush().await?;
    for sub in [&mut published, &mut leased] {
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
            assert!(
                &m.payload[..] != b"forged" && !m.subject.as_str().ends_with(".forged"),
                "a forged write reached {}",
                m.subject
            );
        }
    }
    assert!(
        alarms
            .get_last_raw_message_by_subject("ts.alarms.due.0.1.forged")
            .await
            .is_err(),
        "a forged entry was stored"
    );
    assert!(leases
        .entry(lease)
        .await?
        .is_some_and(|e| &e.value[..] != b"forged"));
    crate::alarms::wait_status(&client, "kept", "pending", 5).await?;

    // The loader's own user may (what the refusals above are measured against; on a
    // subject no loader reads, so nothing removes it meanwhile).
    let own = js_of(&connect_as(&server, Role::AlarmLoader).await?);
    own.publish("ts.alarms.rec.probe", Bytes::from("{}"))
        .await?
        .await
        .context("the loader's user writes its stream")?;
    assert!(alarms
        .get_last_raw_message_by_subject("ts.alarms.rec.probe")
        .await
        .is_ok());
    loader.terminate(Duration::from_secs(10));
    Ok(())
}

/// The scheduler's replies user publishes the answers to clients' inboxes (or any
/// subject of theirs) and nothing else: not on the log, the buckets, the JetStream or
/// services API, the request or event subjects; it subscribes to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replies_user_publishes_answers_but_never_into_our_space() -> Result<()> {
    let server = server()?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(23)]).await?;
    let client_nats = connect(server.url()).await?;
    wait_for_schedulers(&client_nats, 1).await?;
    let p = ProcessId::new("p")?;
    Client::new(client_nats.clone(), Subjects::default())
        .schedule(&p, Bytes::from("one"), &Schedule::default())
        .await?;
    let operator = js_of(&connect_as(&server, Role::Operator).await?);
    let before = log_messages(&operator).await?;

    let (replies, mut errors) = connect_watching(&server.url_as(Role::SchedulerReplies)).await?;
    // An answer reaches a client's inbox.
    let inbox = client_nats.new_inbox();
    let mut answers = client_nats.subscribe(inbox.clone()).await?;
    settled(&client_nats).await?;
    replies.publish(inbox, Bytes::from("an answer")).await?;
    replies.flush().await?;
    let got = tokio::time::timeout(MUST_HAPPEN, answers.next())
        .await
        .context("the answer did not arrive")?
        .context("inbox closed")?;
    assert_eq!(&got.payload[..], b"an answer");

    for subject in [
        "ts.log.p",
        "$KV.TS_PROCESSES.p",
        "$KV.TS_KEYS.evil",
        "$JS.API.STREAM.DELETE.TS_LOG",
        "$JS.API.STREAM.PURGE.TS_LOG",
        "ts.schedule.p",
        "ts.events.fault",
        "$SRV.PING",
    ] {
        replies.publish(subject, Bytes::from("forged")).await?;
        replies.flush().await?;
        expect_violation(&mut errors, subject).await?;
    }
    // It receives nothing.
    let _sub = replies.subscribe("_INBOX.>").await?;
    replies.flush().await?;
    let deadline = tokio::time::Instant::now() + MUST_HAPPEN;
    loop {
        match tokio::time::timeout_at(deadline, errors.recv()).await {
            Ok(Some(e)) if e.contains("Permissions Violation for Subscription") => break,
            Ok(Some(_)) => {}
            _ => bail!("the replies user subscribed"),
        }
    }
    assert_eq!(log_messages(&operator).await?, before, "the log changed");
    let settings = operator.get_key_value("TS_PROCESSES").await?;
    assert_eq!(settings.get("p").await?, None, "a bucket changed");
    assert_eq!(
        Client::new(client_nats.clone(), Subjects::default())
            .schedule(&p, Bytes::from("two"), &Schedule::default())
            .await?
            .slot,
        1
    );
    s.stop().await?;
    Ok(())
}

/// A worker instance's user reads the log and never writes it: no publish on a log
/// subject (plain or JetStream), no removal or administration of the log, the
/// settings or the keys; the work and results streams it may write, never remove.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_worker_reads_the_log_and_never_writes_it() -> Result<()> {
    let server = server()?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(21)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats, Subjects::default());
    let p = ProcessId::new("p")?;
    client
        .schedule(&p, Bytes::from("m"), &Schedule::default())
        .await?;
    let (worker, mut errors) = connect_watching(&server.url_as(Role::JobWorker)).await?;
    let js = js_of(&worker);
    let before = log_messages(&js).await?;
    // It reads the log.
    assert_eq!(
        js.get_stream("TS_LOG")
            .await?
            .get_last_raw_message_by_subject("ts.log.p")
            .await?
            .sequence,
        before
    );
    worker.publish("ts.log.p", Bytes::from("forged")).await?;
    worker.flush().await?;
    expect_violation(&mut errors, "ts.log.p").await?;
    let ack = js_refused(&worker)
        .publish("ts.log.p", Bytes::from("forged"))
        .await?;
    assert!(
        ack.await.is_err(),
        "a JetStream publish on the log was acknowledged"
    );
    expect_violation(&mut errors, "ts.log.p").await?;
    for api in [
        "$JS.API.STREAM.DELETE.TS_LOG",
        "$JS.API.STREAM.PURGE.TS_LOG",
        "$JS.API.STREAM.UPDATE.TS_LOG",
        "$JS.API.STREAM.PURGE.TS_WORK",
        "$JS.API.STREAM.DELETE.TS_RESULTS",
        "$KV.TS_PROCESSES.p",
        "$KV.TS_KEYS.forged",
    ] {
        worker.publish(api, Bytes::from("{}")).await?;
        worker.flush().await?;
        expect_violation(&mut errors, api).await?;
    }
    assert_eq!(log_messages(&js).await?, before, "the log changed");
    s.stop().await?;
    Ok(())
}
