//! A three-node JetStream cluster (`harness::NatsCluster`): an R3 stream across a
//! leader's death, the scheduler started on a cluster that has just formed, and the
//! whole cluster killed at once under a writer.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use harness::NatsCluster;

use crate::support::*;

/// Publishes `payload` with the message id `id`, retrying what a leader change does to
/// a publish (no responders, timeouts, a lost connection) for up to 60 s; the id makes
/// a retry of a write that did land a duplicate the stream drops.
async fn publish_retrying(js: &jetstream::Context, subject: &str, id: &str) -> Result<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            js.publish_with_headers(subject.to_string(), headers, Bytes::from(id.to_string()))
                .await?
                .await
                .map_err(anyhow::Error::from)
        };
        match attempt.await {
            Ok(ack) => return Ok(ack.sequence),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, id, "publish failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("publishing {id}")),
        }
    }
}

/// The stream's leader, waiting up to 30 s for one that is not `not`.
async fn leader_other_than(
    cluster: &NatsCluster,
    stream: &str,
    not: Option<usize>,
) -> Result<usize> {
    for _ in 0..300 {
        if let Ok(Some(l)) = cluster.stream_leader(stream).await {
            if Some(l) != not {
                return Ok(l);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("stream {stream} had no leader other than {not:?} within 30 s")
}

/// Every payload stored in `stream`, read back by sequence from its leader.
async fn payloads(js: &jetstream::Context, name: &str) -> Result<BTreeSet<String>> {
    let mut stream = js.get_stream(name).await?;
    let last = stream.info().await?.state.last_sequence;
    let mut out = BTreeSet::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await?;
        out.insert(String::from_utf8(m.payload.to_vec())?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_keeps_taking_writes_after_its_leader_is_killed_and_keeps_them_all(
) -> Result<()> {
    let mut cluster = NatsCluster::start(3)?;
    let js = jetstream::new(connect(&cluster.url_as(Role::Operator)).await?);
    let name = "R3_PROBE";
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec!["probe.>".into()],
        num_replicas: 3,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;

    let ids = |range: std::ops::Range<usize>| range.map(|i| format!("m{i:03}"));
    for id in ids(0..50) {
        publish_retrying(&js, "probe.a", &id).await?;
    }
    let first = leader_other_than(&cluster, name, None).await?;
    cluster.kill(first);
    // Writes go on while (and after) the survivors elect a new leader.
    for id in ids(50..100) {
        publish_retrying(&js, "probe.a", &id).await?;
    }
    let second = leader_other_than(&cluster, name, Some(first)).await?;
    assert_ne!(second, first);
    let expected: BTreeSet<String> = ids(0..100).collect();
    assert_eq!(payloads(&js, name).await?, expected);
    assert_eq!(js.get_stream(name).await?.info().await?.state.messages, 100);

    // The killed node comes back in place (same ports, same store) and catches up.
    cluster.restart(first)?;
    let node = jetstream::new(connect(&cluster.node_url_as(first, Role::Operator)).await?);
    let mut caught_up = false;
    for _ in 0..300 {
        let info = node.get_stream(name).await?.info().await?.clone();
        let replicas = info.cluster.map(|c| c.replicas).unwrap_or_default();
        if replicas.len() == 2 && replicas.iter().all(|r| r.current && !r.offline) {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(caught_up, "node {first} did not catch up within 30 s");
    Ok(())
}

/// Waits until a scheduler answers PING, failing at once if `process` exits first.
async fn wait_for_scheduler(
    client: &async_nats::Client,
    process: &mut harness::Process,
) -> Result<()> {
    for _ in 0..120 {
        if let Some(status) = process.exited() {
            bail!("the scheduler exited with {status} before it answered");
        }
        if wait_for_one_ping(client).await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    bail!("no scheduler answered PING within 60 s")
}

async fn wait_for_one_ping(client: &async_nats::Client) -> Result<bool> {
    match tokio::time::timeout(
        Duration::from_millis(100),
        client.request("$SRV.PING.turnstile-scheduler", Bytes::new()),
    )
    .await
    {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(false),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Ok(false),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_started_with_a_fresh_cluster_comes_up_and_writes_an_r3_log() -> Result<()> {
    let options = harness::ClusterOptions {
        unformed: true,
        ..Default::default()
    };
    let cluster = NatsCluster::start_with(3, options)?;
    let dir = tempfile::tempdir()?;
    let key = test_key(31);
    let path = key_file(dir.path(), &key)?;
    // At once, while the nodes are still electing a meta leader: the scheduler must
    // wait that out, then the elections of the log's and buckets' leaders, instead of
    // exiting on the first "no stream found" or "temporarily unavailable".
    let mut scheduler = spawn_scheduler(&cluster, &path, &["--replicas", "3"])?;
    let nats = connect(&cluster.url()).await?;
    wait_for_scheduler(&nats, &mut scheduler).await?;

    let client = journal::client::Client::new(nats, journal::subjects::Subjects::default());
    let p = protocol::ProcessId::new("fresh")?;
    for i in 0..5u64 {
        let body = Bytes::from(format!("m{i}"));
        let r = schedule_retrying(&client, &p, body, &Default::default()).await?;
        assert_eq!(r.slot, i);
    }
    let entries = read_log(&cluster.url(), &p).await?;
    assert_eq!(entries.len(), 5);

    let js = jetstream::new(connect(&cluster.url_as(Role::Operator)).await?);
    for name in ["TS_LOG", "KV_TS_PROCESSES", "KV_TS_KEYS"] {
        let info = js.get_stream(name).await?.cached_info().clone();
        let followers = info.cluster.map(|c| c.replicas.len());
        assert_eq!(
            (info.config.num_replicas, followers),
            (3, Some(2)),
            "{name}"
        );
    }
    assert!(scheduler.exited().is_none(), "the scheduler exited");
    Ok(())
}

/// A deployment the scheduler cannot work with, made before it starts.
enum Misconfiguration {
    /// TS_LOG exists but takes other subjects: it cannot be the log.
    ForeignLogStream,
    /// `--replicas 3` on a server without a cluster (JetStream error 10074).
    ReplicasWithoutCluster,
}

/// Runs the scheduler against `server` prepared with `bad`; returns its exit status and
/// stderr. A step retried as transient would run for a minute: 30 s is far beyond a
/// refusal and far below that.
async fn run_misconfigured(bad: Misconfiguration) -> Result<(std::process::ExitStatus, String)> {
    let server = server()?;
    let mut args: Vec<&str> = Vec::new();
    match bad {
        Misconfiguration::ForeignLogStream => {
            let js = jetstream::new(connect_as(&server, Role::Operator).await?);
            js.create_stream(stream::Config {
                name: "TS_LOG".into(),
                subjects: vec!["elsewhere.>".into()],
                ..Default::default()
            })
            .await?;
        }
        Misconfiguration::ReplicasWithoutCluster => args.extend(["--replicas", "3"]),
    }
    let dir = tempfile::tempdir()?;
    let path = key_file(dir.path(), &test_key(32))?;
    crate::support::run_to_its_end(scheduler_command(&server, &path, &args)?, "scheduler").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfiguration_ends_the_scheduler_at_once_with_one_clear_line() -> Result<()> {
    for (bad, names) in [
        (Misconfiguration::ForeignLogStream, "TS_LOG"),
        (Misconfiguration::ReplicasWithoutCluster, "10074"),
    ] {
        let (status, stderr) = run_misconfigured(bad).await?;
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!status.success(), "{status}: {stderr}");
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].starts_with("scheduler: ") && lines[0].contains(names),
            "{stderr}"
        );
    }
    Ok(())
}

/// The whole cluster loses power at once (every node SIGKILLed) while a client writes
/// with message ids, and comes back: every request acknowledged before is in the log
/// at the slot its receipt gave; every request in flight is, after the client's
/// retries with the same id, written exactly once; the slots have no gap and no twin,
/// and `turnstile verify` accepts the log (nodes fsync every write, as deployed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_killed_at_once_loses_no_acknowledged_write_and_writes_each_id_once(
) -> Result<()> {
    let mut cluster = NatsCluster::start(3)?;
    let dir = tempfile::tempdir()?;
    let path = key_file(dir.path(), &test_key(32))?;
    let mut scheduler = spawn_scheduler(&cluster, &path, &["--replicas", "3"])?;
    let nats = connect(&cluster.url()).await?;
    wait_for_scheduler(&nats, &mut scheduler).await?;
    let client = journal::client::Client::new(nats, journal::subjects::Subjects::default());
    let p = protocol::ProcessId::new("powerloss")?;
    let send = |client: journal::client::Client, p: protocol::ProcessId, id: String| async move {
        let opts = journal::client::Schedule {
            message_id: Some(id.clone()),
            ..Default::default()
        };
        let r = schedule_retrying(&client, &p, Bytes::from(format!("body of {id}")), &opts).await?;
        anyhow::Ok((id, r.slot))
    };
    let mut receipts = Vec::new();
    for i in 0..30 {
        receipts.push(send(client.clone(), p.clone(), format!("before-{i}")).await?);
    }
    // A writer keeps going through the outage (each request retried with its id).
    let writer = {
        let (client, p) = (client.clone(), p.clone());
        tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..200 {
                got.push(send(client.clone(), p.clone(), format!("during-{i}")).await?);
            }
            anyhow::Ok(got)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !writer.is_finished(),
        "the writer was done before the outage: the test saw no request in flight"
    );
    cluster.kill_all();
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.restart_all()?;
    receipts.extend(writer.await??);
    // The ids sent before, sent again: duplicates, answered with their slots.
    for (id, slot) in receipts[..30].iter().cloned() {
        let again = send(client.clone(), p.clone(), id.clone()).await?;
        assert_eq!(again, (id, slot));
    }
    assert!(scheduler.exited().is_none(), "the scheduler exited");

    let entries = read_log(&cluster.url(), &p).await?;
    let slots: Vec<u64> = entries.iter().map(|e| e.slot).collect();
    assert_eq!(slots, (0..230).collect::<Vec<u64>>(), "no gap, no twin");
    let by_id: std::collections::BTreeMap<&str, u64> = entries
        .iter()
        .map(|e| (e.message_id.as_str(), e.slot))
        .collect();
    assert_eq!(by_id.len(), 230, "an id written twice");
    for (id, slot) in &receipts {
        assert_eq!(
            by_id.get(id.as_str()),
            Some(slot),
            "{id}: its receipt and the log"
        );
    }
    // Exit status 0: every run verifies (cli_ok fails otherwise).
    let said = cli_ok(&cluster.url(), &["verify", "powerloss"]).await?;
    assert!(
        said.contains("slots 0..=229 verified (230 assignments"),
        "{said}"
    );
    Ok(())
}

/// On an R3 alarm stream a replace's first read (a direct get) may come from a follower
/// that has not stored the last write yet: that only fails its compare-and-set, and the
/// leader's read after it succeeds. Sequential replaces are all accepted, and racing
/// ones leave exactly the accepted records with the last one's entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaces_on_an_r3_alarm_stream_are_accepted_whatever_replica_answers_the_read(
) -> Result<()> {
    use crate::alarms::{alarm, now_ms, set_body};
    let cluster = NatsCluster::start(3)?;
    let mut loader = harness::Process::spawn(crate::support::loader_command(
        &cluster,
        &["--replicas", "3"],
    )?)?;
    let client = connect(&cluster.url()).await?;
    crate::alarms::wait_for_loaders(&client, 1).await?;
    let base = now_ms() + 3_600_000;
    let mut last = 0;
    for i in 0..40u64 {
        let answer = alarm(
            &client,
            "set",
            set_body("r3", base + i * 20_000, "p", &format!("b{i}")),
        )
        .await?
        .map_err(|code| anyhow::anyhow!("replace {i} refused {code}"))?;
        assert_eq!(answer["replaced"], i > 0, "{answer}");
        let seq = answer["seq"].as_u64().context("seq")?;
        assert!(seq > last, "{answer}");
        last = seq;
    }
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let c = connect(&cluster.url()).await?;
        tasks.push(tokio::spawn(async move {
            alarm(&c, "set", set_body("r3", base + i * 20_000, "p", "raced")).await
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        match t.await?? {
            Ok(_) => accepted += 1,
            Err(code) if code == "busy" => {}
            Err(code) => bail!("a racing replace refused {code}"),
        }
    }
    assert!(accepted > 0);
    let got = alarm(&client, "get", serde_json::json!({"id": "r3"}))
        .await?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(
        got["history"].as_array().map(Vec::len),
        Some(40 + accepted),
        "{got}"
    );
    assert_eq!(got["foreign"], serde_json::json!([]), "{got}");
    loader.terminate(Duration::from_secs(10));
    Ok(())
}
