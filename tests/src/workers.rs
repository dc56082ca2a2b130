//! Workers: a group of instances runs every job of the log once, records it, survives
//! an instance killed mid-job, and never turns a foreign message into a job.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use harness::{NatsServer, Role};
use journal::client::{Client, Schedule};
use journal::subjects::Subjects;
use protocol::ProcessId;
use worker::job::{ResultEvent, State};

use crate::support::{
    connect, connect_as, job_results, key_file, server, settled, spawn_scheduler, test_key,
    wait_for_schedulers, wait_for_service, worker_command,
};

/// A worker instance of `group` whose handler runs `script` with `sh -c`.
pub(crate) fn spawn_worker(
    server: &NatsServer,
    group: &str,
    script: &str,
    extra: &[&str],
) -> Result<harness::Process> {
    let mut args = vec!["--lease-ms", "2000"];
    args.extend_from_slice(extra);
    Ok(harness::Process::spawn(worker_command(
        server, group, script, &args, "warn",
    )?)?)
}

/// A handler that appends `<process>:<slot>` to `out`.
fn appender(out: &Path) -> String {
    format!("echo \"$TS_PROCESS:$TS_SLOT\" >> {}", out.display())
}

/// Every event of every job of `group` in the results stream, by job id.
pub(crate) async fn results(
    js: &async_nats::jetstream::Context,
    group: &str,
) -> Result<BTreeMap<String, Vec<ResultEvent>>> {
    Ok(job_results(js, group).await?.jobs)
}

/// Waits until `n` jobs of `group` have a final result (at most `secs`).
pub(crate) async fn wait_final(
    js: &async_nats::jetstream::Context,
    group: &str,
    n: usize,
    secs: u64,
) -> Result<BTreeMap<String, Vec<ResultEvent>>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let r = results(js, group).await?;
        let finals = r
            .values()
            .filter(|evs| evs.iter().any(|e| e.state.is_final()))
            .count();
        if finals >= n {
            return Ok(r);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{finals} of {n} jobs final after {secs} s: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Instance `id`'s introspection (`ts.worker.inspect.<id>`), and the ids of the jobs
/// waiting in its buffer.
pub(crate) async fn inspect(
    nats: &async_nats::Client,
    id: &str,
) -> Result<(serde_json::Value, Vec<String>)> {
    let reply = nats
        .request(format!("ts.worker.inspect.{id}"), Bytes::new())
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    let pending = v["pending"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["id"].as_str().map(str::to_string))
        .collect();
    Ok((v, pending))
}

pub(crate) fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn schedule_many(
    client: &Client,
    processes: usize,
    per: usize,
    tag: &str,
) -> Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    let mut tasks = Vec::new();
    for p in 0..processes {
        let client = client.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let process = ProcessId::new(format!("w{p}"))?;
            let mut got = Vec::new();
            for i in 0..per {
                let opts = Schedule {
                    message_id: Some(format!("{tag}-{p}-{i}")),
                    ..Default::default()
                };
                let r = client
                    .schedule(&process, Bytes::from(format!("{tag} {i}")), &opts)
                    .await?;
                got.push(format!("{process}:{}", r.slot));
            }
            anyhow::Ok(got)
        }));
    }
    for t in tasks {
        ids.extend(t.await??);
    }
    Ok(ids)
}

/// Two instances of one group run 200 jobs of 8 processes: each job ran once, each
/// has exactly one `done` in its history, and nothing else is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_runs_every_job_once_and_records_it() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(71))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let _a = spawn_worker(&server, "g1", &appender(&out), &[])?;
    let _b = spawn_worker(&server, "g1", &appender(&out), &[])?;
    wait_for_service(&nats, "turnstile-worker", 2).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let client = Client::new(nats, Subjects::default());
    let ids = schedule_many(&client, 8, 25, "a").await?;
    assert_eq!(ids.len(), 200);
    let js = async_nats::jetstream::new(operator);
    let r = wait_final(&js, "g1", 200, 60).await?;
    let ran = lines(&out);
    let distinct: BTreeSet<String> = ran.iter().cloned().collect();
    assert_eq!(distinct, ids, "the jobs run are the assignments made");
    assert_eq!(ran.len(), ids.len(), "a job ran twice");
    for (id, evs) in &r {
        let states: Vec<State> = evs.iter().map(|e| e.state).collect();
        assert_eq!(states, vec![State::Done], "{id}: {evs:?}");
    }
    assert_eq!(r.keys().cloned().collect::<BTreeSet<_>>(), ids);
    Ok(())
}

/// Two groups serving the same processes each get every job: a group's work is its
/// own (the work stream drops a copy only of the same group's job, never another
/// group's), and each group's history has every job done once. The groups are named
/// to meet where names once did: strict group `gx`'s consumer of the partition of
/// process `w0` was `group-gx-p<n>`, the name of unordered group `gx-p<n>`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_serving_the_same_processes_each_run_every_job_once() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(78))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let (out_a, out_b) = (dir.path().join("out-a"), dir.path().join("out-b"));
    let n = worker::job::partition_of("w0", worker::job::PARTITIONS);
    let (ga, gb) = (format!("gx-p{n}"), "gx".to_string());
    let _b = spawn_worker(&server, &gb, &appender(&out_b), &["--ordering", "strict"])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let _a = spawn_worker(&server, &ga, &appender(&out_a), &[])?;
    wait_for_service(&nats, "turnstile-worker", 2).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let client = Client::new(nats, Subjects::default());
    let ids = schedule_many(&client, 4, 10, "two").await?;
    assert_eq!(ids.len(), 40);
    let js = async_nats::jetstream::new(operator);
    for (group, out) in [(ga.as_str(), &out_a), (gb.as_str(), &out_b)] {
        let r = wait_final(&js, group, ids.len(), 60).await?;
        assert_eq!(r.keys().cloned().collect::<BTreeSet<_>>(), ids, "{group}");
        for (id, evs) in &r {
            let states: Vec<State> = evs.iter().map(|e| e.state).collect();
            assert_eq!(states, vec![State::Done], "{group} {id}: {evs:?}");
        }
        let ran = lines(out);
        assert_eq!(ran.len(), ids.len(), "{group}: {ran:?}");
        assert_eq!(ran.into_iter().collect::<BTreeSet<_>>(), ids, "{group}");
    }
    Ok(())
}

/// An instance SIGKILLed while it runs a long job: the job is handed out again once
/// the work stream's wait for it runs out and is done once; the jobs the dead instance
/// had finished are not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_an_instance_killed_mid_job_is_done_once_by_another() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(72))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let started = dir.path().join("started");
    // A body "slow" marks the job as started, then takes 3 s; others finish at once.
    let script = format!(
        "b=$(cat); if [ \"$b\" = slow ]; then echo \"$TS_PROCESS:$TS_SLOT $PPID\" >> {s}; sleep 10; fi; echo \"$TS_PROCESS:$TS_SLOT\" >> {o}",
        s = started.display(),
        o = out.display()
    );
    let extra = ["--ack-wait-ms", "2000", "--concurrency", "4"];
    let mut a = spawn_worker(&server, "g2", &script, &extra)?;
    let mut b = spawn_worker(&server, "g2", &script, &extra)?;
    wait_for_service(&nats, "turnstile-worker", 2).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let client = Client::new(nats, Subjects::default());
    let mut ids = schedule_many(&client, 4, 10, "k").await?;
    let slow = client
        .schedule(
            &ProcessId::new("slowp")?,
            Bytes::from("slow"),
            &Schedule::default(),
        )
        .await?;
    ids.insert(format!("slowp:{}", slow.slot));
    // Every other job is final first: what the killed instance leaves is the slow job.
    let js = async_nats::jetstream::new(operator);
    wait_final(&js, "g2", ids.len() - 1, 60).await?;
    // Wait until the slow job started somewhere, and kill that instance.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let runner_pid = loop {
        if let Some(l) = lines(&started).first() {
            break l.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the slow job never started");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let killed = if runner_pid == a.pid() {
        a.kill();
        "a"
    } else if runner_pid == b.pid() {
        b.kill();
        "b"
    } else {
        bail!("the slow job's parent {runner_pid:?} is neither instance");
    };
    let r = wait_final(&js, "g2", ids.len(), 60).await?;
    assert_eq!(r.keys().cloned().collect::<BTreeSet<_>>(), ids);
    for (id, evs) in &r {
        let done = evs.iter().filter(|e| e.state == State::Done).count();
        assert_eq!(done, 1, "{id}: {evs:?}");
    }
    // The slow job started twice (the killed attempt, then the other instance's) and
    // finished once; every other job ran once.
    assert_eq!(
        lines(&started).len(),
        2,
        "killed {killed}: {:?}",
        lines(&started)
    );
    let ran = lines(&out);
    assert_eq!(ran.len(), ids.len(), "a finished job ran again: {ran:?}");
    assert_eq!(ran.iter().cloned().collect::<BTreeSet<_>>(), ids);
    Ok(())
}

/// A replay of a genuine run (valid seal, wrong place) and garbage on a log subject:
/// each is a recorded fault, never a job; the genuine jobs still run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_run_or_garbage_on_the_log_is_a_fault_never_a_job() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(73))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let _a = spawn_worker(&server, "g3", &appender(&out), &[])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let client = Client::new(nats, Subjects::default());
    let p = ProcessId::new("victim")?;
    let first = client
        .schedule(&p, Bytes::from("one"), &Schedule::default())
        .await?;
    let js = async_nats::jetstream::new(operator.clone());
    wait_final(&js, "g3", 1, 30).await?;
    // Replay the stored run, then garbage, then a genuine second message.
    let log = js.get_stream("TS_LOG").await?;
    let stored = log.get_last_raw_message_by_subject("ts.log.victim").await?;
    js.publish("ts.log.victim", stored.payload.clone())
        .await?
        .await?;
    js.publish("ts.log.victim", Bytes::from_static(b"\x00garbage"))
        .await?
        .await?;
    let second = client
        .schedule(&p, Bytes::from("two"), &Schedule::default())
        .await?;
    wait_final(&js, "g3", 2, 30).await?;
    // Both faults are recorded.
    let results = js.get_stream("TS_RESULTS").await?;
    let consumer = results
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: "ts.result.g3.victim.fault".into(),
            ..Default::default()
        })
        .await?;
    let mut faults = Vec::new();
    let mut msgs = consumer.messages().await?;
    while faults.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(30), msgs.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("no fault"))??;
        faults.push(serde_json::from_slice::<worker::job::FaultEvent>(
            &m.payload,
        )?);
    }
    assert!(faults.iter().all(|f| !f.handed_out), "{faults:?}");
    let ran = lines(&out);
    assert_eq!(
        ran,
        vec![
            format!("victim:{}", first.slot),
            format!("victim:{}", second.slot)
        ],
        "jobs run"
    );
    Ok(())
}

/// A job whose handler keeps failing is tried `--max-attempts` times with backoff,
/// then dead: announced on `ts.worker.dead.<group>`, and its whole history (and the
/// process's jobs by state) shown by the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_is_retried_then_dead_and_the_cli_shows_its_history() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(74))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let _a = spawn_worker(
        &server,
        "g4",
        "echo nope >&2; exit 3",
        &["--max-attempts", "3", "--backoff-ms", "100"],
    )?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let mut dead = operator.subscribe("ts.worker.dead.g4").await?;
    settled(&operator).await?;
    let client = Client::new(nats, Subjects::default());
    let p = ProcessId::new("failing")?;
    let r = client
        .schedule(&p, Bytes::from("x"), &Schedule::default())
        .await?;
    let letter = tokio::time::timeout(Duration::from_secs(30), dead.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no dead letter"))?;
    let ev: ResultEvent = serde_json::from_slice(&letter.payload)?;
    assert_eq!((ev.state, ev.attempt, ev.slot), (State::Dead, 3, r.slot));
    assert!(
        ev.reason
            .as_deref()
            .is_some_and(|r| r.contains("exit 3: nope")),
        "{ev:?}"
    );
    let slot = r.slot.to_string();
    let out = crate::support::cli_ok(server.url(), &["job", "get", "g4", "failing", &slot]).await?;
    let states: Vec<(String, u64)> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["state"].as_str().unwrap().to_string(),
                v["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("failed".into(), 1),
            ("failed".into(), 2),
            ("dead".into(), 3)
        ]
    );
    let listed =
        crate::support::cli_ok(server.url(), &["jobs", "g4", "failing", "--state", "dead"]).await?;
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let none =
        crate::support::cli_ok(server.url(), &["jobs", "g4", "failing", "--state", "done"]).await?;
    assert_eq!(none, "");
    // A job with no history: exit status 1.
    let missing =
        crate::support::turnstile(server.url(), &["job", "get", "g4", "failing", "99"]).await?;
    assert_eq!(missing.status.code(), Some(1));
    Ok(())
}

/// `turnstile workers` lists the group's instance; `turnstile worker inspect` shows
/// the job it runs (with push and start times), the jobs waiting in its buffer (with
/// push times), its status and its backlog, as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_shows_what_an_instance_holds_as_it_is() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(75))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let _a = spawn_worker(
        &server,
        "g5",
        "sleep 30",
        &["--concurrency", "1", "--buffer", "queue"],
    )?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let client = Client::new(nats, Subjects::default());
    let p = ProcessId::new("held")?;
    for i in 0..4 {
        client
            .schedule(&p, Bytes::from(format!("{i}")), &Schedule::default())
            .await?;
    }
    let listed = crate::support::cli_ok(server.url(), &["workers"]).await?;
    let group: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap_or("{}"))?;
    assert_eq!(group["group"], "g5", "{listed}");
    let id = group["instances"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(group["instances"].as_array().map(Vec::len), Some(1));
    // Wait until the buffer holds the three others.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let out = crate::support::cli_ok(server.url(), &["worker", "inspect", &id]).await?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        if v["pending"].as_array().map(Vec::len) == Some(3)
            && v["running"].as_array().map(Vec::len) == Some(1)
        {
            break v;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("never 1 running and 3 pending: {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(seen["status"]["status"], "running");
    assert_eq!(seen["group"], "g5");
    assert_eq!(seen["buffer"], "queue");
    let running = &seen["running"][0];
    assert_eq!(running["id"], "held:0");
    assert!(running["started_ms"].as_u64() >= running["pushed_ms"].as_u64());
    let pending: Vec<&str> = seen["pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(pending, vec!["held:1", "held:2", "held:3"]);
    assert!(seen["pending"][0]["pushed_ms"].as_u64().is_some());
    assert!(
        seen["backlog"]
            .as_array()
            .is_some_and(|b| b.iter().any(|e| e["message"] == "running")),
        "{seen}"
    );
    // An unknown instance: a clear error.
    let unknown = crate::support::turnstile(server.url(), &["worker", "inspect", "nobody"]).await?;
    assert_eq!(unknown.status.code(), Some(2));
    Ok(())
}

/// SIGTERM: the instance stops fetching, hands back the jobs waiting in its buffer at
/// once (another instance takes them long before the 30 s redelivery wait), finishes
/// the one it runs, and exits; every job is done once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_back_waiting_jobs_at_once() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(76))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let script = format!(
        "sleep 1; echo \"$TS_PROCESS:$TS_SLOT\" >> {}",
        out.display()
    );
    let mut a = spawn_worker(
        &server,
        "g6",
        &script,
        &["--concurrency", "1", "--buffer", "queue"],
    )?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let ids = schedule_many(&client, 1, 8, "t").await?;
    // Let `a` take them all into its buffer, then start `b` and stop `a`.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _b = spawn_worker(&server, "g6", &script, &["--concurrency", "4"])?;
    wait_for_service(&nats, "turnstile-worker", 2).await?;
    let t = std::time::Instant::now();
    let exited = tokio::task::spawn_blocking(move || a.terminate(Duration::from_secs(15))).await?;
    assert!(exited, "a did not exit within 15 s of SIGTERM");
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let r = wait_final(&js, "g6", ids.len(), 20).await?;
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "handed back late: {:?}",
        t.elapsed()
    );
    for (id, evs) in &r {
        assert_eq!(
            evs.iter().filter(|e| e.state == State::Done).count(),
            1,
            "{id}: {evs:?}"
        );
    }
    let ran = lines(&out);
    assert_eq!(ran.len(), ids.len(), "{ran:?}");
    Ok(())
}

/// A dropbox instance busy with one job: five more with one merge key merge into the
/// newest, which runs; the four merged away are recorded `merged` (each into the job
/// that replaced it), none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropbox_merges_pending_jobs_by_key_and_records_the_merged() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(77))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let script = format!(
        "b=$(cat); [ \"$b\" = slow ] && sleep 3; echo \"$TS_PROCESS:$TS_SLOT\" >> {}",
        out.display()
    );
    let _a = spawn_worker(
        &server,
        "g7",
        &script,
        &["--concurrency", "1", "--buffer", "dropbox"],
    )?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let client = Client::new(nats, Subjects::default());
    let p = ProcessId::new("box")?;
    client
        .schedule(&p, Bytes::from("slow"), &Schedule::default())
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut last = 0;
    for i in 0..5 {
        let opts = Schedule {
            headers: vec![("Merge-Key".into(), "k".into())],
            ..Default::default()
        };
        last = client
            .schedule(&p, Bytes::from(format!("v{i}")), &opts)
            .await?
            .slot;
    }
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let r = wait_final(&js, "g7", 6, 30).await?;
    let state_of = |slot: u64| {
        r[&format!("box:{slot}")]
            .last()
            .map(|e| (e.state, e.merged_into))
    };
    assert_eq!(state_of(0), Some((State::Done, None)));
    assert_eq!(state_of(last), Some((State::Done, None)));
    // Each was merged into the next one (which was then merged on, up to the newest).
    for slot in 1..last {
        assert_eq!(
            state_of(slot),
            Some((State::Merged, Some(slot + 1))),
            "slot {slot}: {r:#?}"
        );
    }
    assert_eq!(
        lines(&out),
        vec!["box:0".to_string(), format!("box:{last}")]
    );
    Ok(())
}

/// A group scaled 1 → 3 → 1 while jobs keep coming: the feed moves as members join
/// (the ownership crate's balance) and again when the first instance is SIGKILLed
/// (whoever holds it then resumes from the checkpoint), and one instance
/// stopped with SIGTERM: no job lost, each done exactly once in its history. (A job the
/// killed instance was running may have run twice — at least once is what a kill
/// allows — but it is recorded done once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_1_3_1_with_the_feeder_killed_no_job_is_lost_or_done_twice() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(78))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let extra = ["--ack-wait-ms", "2000"];
    let mut a = spawn_worker(&server, "g8", &appender(&out), &extra)?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    // 8 processes, a message every 10 ms each, for ~8 s.
    let producer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut ids = BTreeSet::new();
            for i in 0..100 {
                let batch: Vec<_> = (0..8)
                    .map(|p| {
                        let client = client.clone();
                        tokio::spawn(async move {
                            let process = ProcessId::new(format!("s{p}"))?;
                            let opts = Schedule {
                                message_id: Some(format!("s-{p}-{i}")),
                                ..Default::default()
                            };
                            let r = crate::support::schedule_retrying(
                                &client,
                                &process,
                                Bytes::from("x"),
                                &opts,
                            )
                            .await?;
                            anyhow::Ok(format!("{process}:{}", r.slot))
                        })
                    })
                    .collect();
                for t in batch {
                    ids.insert(t.await??);
                }
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
            anyhow::Ok(ids)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut b = spawn_worker(&server, "g8", &appender(&out), &extra)?;
    let mut c = spawn_worker(&server, "g8", &appender(&out), &extra)?;
    wait_for_service(&nats, "turnstile-worker", 3).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.kill(); // the first instance: the feeder
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = tokio::task::spawn_blocking(move || c.terminate(Duration::from_secs(15))).await?;
    assert!(stopped, "c did not stop within 15 s of SIGTERM");
    let ids = producer.await??;
    assert_eq!(ids.len(), 800);
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let r = wait_final(&js, "g8", ids.len(), 90).await?;
    assert_eq!(r.keys().cloned().collect::<BTreeSet<_>>(), ids);
    for (id, evs) in &r {
        let done = evs.iter().filter(|e| e.state == State::Done).count();
        assert_eq!(done, 1, "{id}: {evs:?}");
    }
    let ran = lines(&out);
    assert_eq!(ran.iter().cloned().collect::<BTreeSet<_>>(), ids);
    assert!(
        ran.len() - ids.len() <= 16,
        "{} runs for {} jobs",
        ran.len(),
        ids.len()
    );
    b.kill();
    Ok(())
}

/// A worker started before any scheduler waits for the keys; a scheduler that starts
/// later with a key the worker has never seen (and another after it, with another
/// key) gets its runs verified and run: the worker reads the published keys again
/// when a run is sealed by a key it does not know yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_learns_keys_published_after_it_started() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    let _w = spawn_worker(&server, "g9", &appender(&out), &[])?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let key = key_file(dir.path(), &test_key(79))?;
    let mut s1 = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let first = client
        .schedule(
            &ProcessId::new("k1")?,
            Bytes::from("a"),
            &Schedule::default(),
        )
        .await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    wait_final(&js, "g9", 1, 30).await?;
    s1.kill();
    let key2 = key_file(dir.path(), &test_key(80))?;
    let _s2 = spawn_scheduler(&server, &key2, &[])?;
    wait_for_schedulers(&nats, 1).await?;
    let second = client
        .schedule(
            &ProcessId::new("k2")?,
            Bytes::from("b"),
            &Schedule::default(),
        )
        .await?;
    wait_final(&js, "g9", 2, 30).await?;
    assert_eq!(
        lines(&out),
        vec![format!("k1:{}", first.slot), format!("k2:{}", second.slot)]
    );
    Ok(())
}

fn operator_env(server: &NatsServer) -> String {
    server.url_as(Role::Operator)
}

/// Pause: no job of the paused group starts (within a second of the pause), across a
/// restart of the instance; a job cancelled meanwhile is recorded `cancelled` and
/// never runs; resume runs the rest. A running job cancelled is stopped (its child
/// killed) and recorded `cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_survives_a_restart_and_cancel_skips_a_queued_job_and_stops_a_running_one(
) -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(81))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let pids = dir.path().join("pids");
    // "long": records its pid, then sleeps; others append at once.
    let script = format!(
        "b=$(cat); if [ \"$b\" = long ]; then echo $$ >> {p}; sleep 60; fi; echo \"$TS_PROCESS:$TS_SLOT\" >> {o}",
        p = pids.display(),
        o = out.display()
    );
    let mut a = spawn_worker(&server, "g10", &script, &[])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let op = operator_env(&server);
    crate::support::cli_ok(&op, &["queue", "pause", "g10"]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("q")?;
    let mut slots = Vec::new();
    for i in 0..3 {
        slots.push(
            client
                .schedule(&p, Bytes::from(format!("m{i}")), &Schedule::default())
                .await?
                .slot,
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        lines(&out).is_empty(),
        "a paused queue ran {:?}",
        lines(&out)
    );
    // Restart the instance: still paused.
    let stopped = tokio::task::spawn_blocking(move || a.terminate(Duration::from_secs(15))).await?;
    assert!(stopped);
    let _a2 = spawn_worker(&server, "g10", &script, &[])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        lines(&out).is_empty(),
        "a paused queue ran after a restart {:?}",
        lines(&out)
    );
    // Cancel the middle one by its message id... by slot here, then resume.
    let s1 = slots[1].to_string();
    crate::support::cli_ok(&op, &["job", "cancel", "g10", "q", &s1]).await?;
    crate::support::cli_ok(&op, &["queue", "resume", "g10"]).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let r = wait_final(&js, "g10", 3, 30).await?;
    assert_eq!(
        r[&format!("q:{}", slots[1])]
            .iter()
            .map(|e| e.state)
            .collect::<Vec<_>>(),
        vec![State::Cancelled]
    );
    let mut ran = lines(&out);
    ran.sort();
    assert_eq!(
        ran,
        vec![format!("q:{}", slots[0]), format!("q:{}", slots[2])]
    );

    // A running job: cancelled while it runs, its child is killed.
    let long = client
        .schedule(&p, Bytes::from("long"), &Schedule::default())
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let pid = loop {
        if let Some(l) = lines(&pids).first() {
            break l.trim().parse::<u32>()?;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the long job never started");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let msg_id = r[&format!("q:{}", slots[0])][0].message_id.clone();
    assert!(!msg_id.is_empty());
    let ls = long.slot.to_string();
    crate::support::cli_ok(&op, &["job", "cancel", "g10", "q", &ls]).await?;
    let r = wait_final(&js, "g10", 4, 20).await?;
    let evs = &r[&format!("q:{}", long.slot)];
    assert_eq!(
        evs.last().map(|e| e.state),
        Some(State::Cancelled),
        "{evs:?}"
    );
    assert!(evs.last().and_then(|e| e.started_ms).is_some());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if tokio::time::Instant::now() > deadline {
            bail!("the cancelled job's child {pid} is still alive");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        lines(&out).len(),
        2,
        "the cancelled job finished: {:?}",
        lines(&out)
    );
    // Both cancels did their work: once their jobs were recorded cancelled, the keys
    // are gone from the bucket (and from every instance's memory).
    let kv = js.get_key_value("TS_WORKERS").await?;
    for slot in [slots[1], long.slot] {
        let key = worker::control::cancel_key("g10", "q", slot);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while kv.get(&key).await?.is_some() {
            if tokio::time::Instant::now() > deadline {
                bail!("{key} is still there after its job was recorded cancelled");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // By message id: the CLI finds the slot in the verified log; that job is done, so
    // the cancel is refused (exit 1) and taken back.
    let by_id =
        crate::support::turnstile(&op, &["job", "cancel", "g10", "q", "--id", &msg_id]).await?;
    let said = String::from_utf8_lossy(&by_id.stdout).to_string();
    assert_eq!(by_id.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("\"slot\":{}", slots[0])), "{said}");
    assert!(said.contains("\"already\":\"done\""), "{said}");
    assert!(said.contains("\"cancelled\":false"), "{said}");
    let key = worker::control::cancel_key("g10", "q", slots[0]);
    assert!(kv.get(&key).await?.is_none(), "{key} kept for a done job");
    // A job already cancelled is final too: cancelling it again is refused and the
    // cancel taken back (it was kept for good: no instance would ever delete it).
    let again = crate::support::turnstile(&op, &["job", "cancel", "g10", "q", &ls]).await?;
    let said = String::from_utf8_lossy(&again.stdout).to_string();
    assert_eq!(again.status.code(), Some(1), "{said}");
    assert!(said.contains("\"already\":\"cancelled\""), "{said}");
    let key = worker::control::cancel_key("g10", "q", long.slot);
    assert!(
        kv.get(&key).await?.is_none(),
        "{key} kept for a cancelled job"
    );
    // A group is a name, never a wildcard over every group's histories.
    for args in [
        vec!["job", "get", "*", "q", ls.as_str()],
        vec!["jobs", "*", "q"],
        vec!["jobs", "g10.x", "q"],
    ] {
        let out = crate::support::turnstile(&op, &args).await?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains("1–48 characters"), "{args:?}: {err}");
    }
    Ok(())
}

/// The server killed and restarted in place under a running instance: the instance's
/// control watch (an ordered consumer, gone with the server) is made again as soon as
/// it reconnects, so a cancel sent right after the restart stops the job it names at
/// once. (Before, the watch noticed its loss only after two missed heartbeats, 30 s
/// and more, and meanwhile ran paused and cancelled jobs: `make chaos WORKERS=1`,
/// seed 1.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_after_a_server_restart_stops_a_job_at_once() -> Result<()> {
    let mut server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(83))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let pids = dir.path().join("pids");
    let script = format!(
        "echo $$ >> {p}; sleep 60; echo \"$TS_PROCESS:$TS_SLOT\" >> {o}",
        p = pids.display(),
        o = out.display()
    );
    let _a = spawn_worker(&server, "g12", &script, &[])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("r")?;
    let long = client
        .schedule(&p, Bytes::from("long"), &Schedule::default())
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let pid = loop {
        if let Some(l) = lines(&pids).first() {
            break l.trim().parse::<u32>()?;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the long job never started");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    server.kill();
    server.restart_in_place()?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let op = operator_env(&server);
    let slot = long.slot.to_string();
    crate::support::cli_ok(&op, &["job", "cancel", "g12", "r", &slot]).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if tokio::time::Instant::now() > deadline {
            bail!("the job cancelled after the server's restart still runs 5 s later");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let js = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    let r = wait_final(&js, "g12", 1, 10).await?;
    let evs = &r[&format!("r:{}", long.slot)];
    assert_eq!(
        evs.last().map(|e| e.state),
        Some(State::Cancelled),
        "{evs:?}"
    );
    assert!(lines(&out).is_empty(), "the cancelled job finished");
    Ok(())
}

/// The server killed and restarted in place under a running group: a job scheduled
/// right after the restart runs within seconds (the feeder's and the instance's
/// readers are made again on reconnect, not after their heartbeats' 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_scheduled_after_a_server_restart_runs_at_once() -> Result<()> {
    let mut server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(85))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let _a = spawn_worker(&server, "g14", &appender(&out), &[])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("s")?;
    client
        .schedule(&p, Bytes::from("before"), &Schedule::default())
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while lines(&out).is_empty() {
        if tokio::time::Instant::now() > deadline {
            bail!("the first job never ran");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.kill();
    server.restart_in_place()?;
    wait_for_schedulers(&nats, 1).await?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let opts = Schedule {
        message_id: Some("after".into()),
        ..Default::default()
    };
    crate::support::schedule_retrying(&client, &p, Bytes::from("after"), &opts).await?;
    let scheduled = tokio::time::Instant::now();
    while lines(&out).len() < 2 {
        if scheduled.elapsed() > Duration::from_secs(8) {
            bail!("a job scheduled after the server's restart did not run within 8 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Control changes while the instance holds many paused jobs: it applies each change
/// (the control, then the running jobs) while its executor scans the buffer (the
/// jobs, then the control) — one lock order only, or the two wait on each other and
/// the instance freezes (it did: `make chaos WORKERS=1`, seed 1, a cancel of a job
/// queued in a paused process). Every job cancelled is recorded so, the rest run
/// after the resume, and the instance answers PING throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_while_many_jobs_wait_paused_do_not_freeze_the_instance() -> Result<()> {
    const JOBS: u64 = 1_000;
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(84))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let _a = spawn_worker(&server, "g13", &appender(&out), &["--buffer", "queue"])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let op = operator_env(&server);
    crate::support::cli_ok(&op, &["queue", "pause", "g13", "--process", "w0"]).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let ids = schedule_many(&client, 1, JOBS as usize, "c").await?;
    assert_eq!(ids.len(), JOBS as usize);
    // Held (paused) by the instance.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let js = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    let kv = js
        .get_key_value(Subjects::default().workers_bucket())
        .await?;
    // Meanwhile the executor scans the buffer again and again: jobs of another
    // process come and go.
    let busy = {
        let client = client.clone();
        tokio::spawn(async move {
            let p = ProcessId::new("busy")?;
            let mut n = 0;
            for i in 0..300 {
                let opts = Schedule {
                    message_id: Some(format!("b-{i}")),
                    ..Default::default()
                };
                crate::support::schedule_retrying(&client, &p, Bytes::from("b"), &opts).await?;
                n += 1;
            }
            anyhow::Ok(n)
        })
    };
    // Every second job cancelled, 50 keys at a time.
    let mut cancelled = BTreeSet::new();
    let slots: Vec<u64> = (0..JOBS).step_by(2).collect();
    for chunk in slots.chunks(50) {
        let puts = chunk.iter().map(|slot| {
            kv.put(
                worker::control::cancel_key("g13", "w0", *slot),
                Bytes::from_static(b"test"),
            )
        });
        for r in futures::future::join_all(puts).await {
            r?;
        }
        cancelled.extend(chunk.iter().map(|slot| format!("w0:{slot}")));
    }
    let busy = busy.await??;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    crate::support::cli_ok(&op, &["queue", "resume", "g13", "--process", "w0"]).await?;
    let r = wait_final(&js, "g13", JOBS as usize + busy, 120).await?;
    for (id, evs) in r.iter().filter(|(id, _)| id.starts_with("w0:")) {
        let want = if cancelled.contains(id) {
            State::Cancelled
        } else {
            State::Done
        };
        assert_eq!(evs.last().map(|e| e.state), Some(want), "{id}: {evs:?}");
    }
    let ran: BTreeSet<String> = lines(&out)
        .into_iter()
        .filter(|l| l.starts_with("w0:"))
        .collect();
    assert_eq!(ran.len() as u64, JOBS / 2, "{ran:?}");
    assert!(ran.is_disjoint(&cancelled), "a cancelled job ran");
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    Ok(())
}

/// Strict order: two instances of a strict group, six processes, 15 jobs each, one
/// of them failing its first attempt, and one instance stopped half-way (its
/// partitions move): every process's jobs ran one at a time, in slot order, the
/// failed one retried before anything after it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_group_runs_each_process_one_job_at_a_time_in_slot_order() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(82))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let script = format!(
        "b=$(cat); echo \"S $TS_PROCESS $TS_SLOT\" >> {o}; \
         if [ \"$b\" = flaky ] && [ ! -f {d}/flaky-$TS_PROCESS ]; then touch {d}/flaky-$TS_PROCESS; echo \"F $TS_PROCESS $TS_SLOT\" >> {o}; exit 1; fi; \
         sleep 0.0$((TS_SLOT % 4)); echo \"E $TS_PROCESS $TS_SLOT\" >> {o}",
        o = out.display(),
        d = dir.path().display()
    );
    let extra = [
        "--ordering",
        "strict",
        "--backoff-ms",
        "100",
        "--concurrency",
        "8",
    ];
    let mut a = spawn_worker(&server, "g11", &script, &extra)?;
    let _b = spawn_worker(&server, "g11", &script, &extra)?;
    wait_for_service(&nats, "turnstile-worker", 2).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let mut tasks = Vec::new();
    for p in 0..6 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let process = ProcessId::new(format!("o{p}"))?;
            for i in 0..15 {
                let body = if i == 5 { "flaky" } else { "ok" };
                client
                    .schedule(&process, Bytes::from(body), &Schedule::default())
                    .await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stopped = tokio::task::spawn_blocking(move || a.terminate(Duration::from_secs(20))).await?;
    assert!(stopped, "a did not stop");
    for t in tasks {
        t.await??;
    }
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let r = wait_final(&js, "g11", 90, 60).await?;
    assert!(
        r.values()
            .all(|evs| evs.last().map(|e| e.state) == Some(State::Done)),
        "{r:?}"
    );
    // Per process: S k (F k S k)? E k, for k = 0, 1, … in order, nothing interleaved.
    let ran = lines(&out);
    for p in 0..6 {
        let name = format!("o{p}");
        let mine: Vec<(String, u64)> = ran
            .iter()
            .filter_map(|l| {
                let mut it = l.split(' ');
                let (kind, proc_, slot) = (it.next()?, it.next()?, it.next()?);
                let slot: u64 = slot.parse().ok()?;
                (proc_ == name).then(|| (kind.to_string(), slot))
            })
            .collect();
        let mut expected = Vec::new();
        for k in 0..15u64 {
            expected.push(("S".to_string(), k));
            if k == 5 {
                expected.push(("F".to_string(), k));
                expected.push(("S".to_string(), k));
            }
            expected.push(("E".to_string(), k));
        }
        assert_eq!(mine, expected, "process {name}");
    }
    Ok(())
}

/// A bounded buffer: the instance fetches only while it has room, so it never holds
/// more than its bound (plus what runs) however far the producer runs ahead; nothing
/// is dropped: every job is done once in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_buffer_holds_no_more_than_its_bound_and_drops_nothing() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(83))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let _a = spawn_worker(
        &server,
        "g12",
        "sleep 0.3",
        &["--buffer", "bounded:2", "--concurrency", "1"],
    )?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let id = only_instance(&nats).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let ids = schedule_many(&client, 2, 6, "bb").await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let work = js.get_stream("TS_WORK").await?;
    let mut max_pending = 0;
    let mut max_held = 0;
    for _ in 0..15 {
        let (v, pending) = inspect(&nats, &id).await?;
        let pending = pending.len();
        let running = v["running"].as_array().map(Vec::len).unwrap_or(0);
        max_pending = max_pending.max(pending);
        assert!(running <= 1, "{v}");
        let held = work.consumer_info("group-g12").await?.num_ack_pending;
        max_held = max_held.max(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(max_pending <= 2, "the buffer held {max_pending}");
    assert!(
        max_pending >= 1,
        "the buffer never held anything: the test saw no backlog"
    );
    assert!(
        max_held <= 3,
        "{max_held} jobs delivered and not acknowledged"
    );
    let r = wait_final(&js, "g12", ids.len(), 60).await?;
    assert!(r
        .values()
        .all(|evs| evs.iter().map(|e| e.state).collect::<Vec<_>>() == vec![State::Done]));
    Ok(())
}

/// Hostile requests to an instance's introspection subject, as raw protocol bytes (a
/// header block that does not parse, a huge body, a reply subject inside our own
/// space): the instance answers what it can, never into our space, and goes on
/// running jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_introspection_requests_do_not_stop_an_instance() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(84))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let _a = spawn_worker(&server, "g13", &appender(&out), &[])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let id = only_instance(&nats).await?;
    let subject = format!("ts.worker.inspect.{id}");
    let mut raw = crate::raw::RawClient::connect(server.url()).await?;
    let s = subject.as_bytes();
    use crate::raw::publish;
    raw.send(&publish(
        s,
        Some(b"_INBOX.x"),
        Some(b"NATS/1.0\r\nno colon here\r\n\r\n"),
        b"x",
    ))
    .await?;
    raw.send(&publish(
        s,
        Some(b"ts.log.evil"),
        Some(b"NATS/1.0\r\n\r\n"),
        b"",
    ))
    .await?;
    raw.send(&publish(
        s,
        Some(b"$JS.API.STREAM.DELETE.TS_LOG"),
        None,
        &vec![b'x'; 512 * 1024],
    ))
    .await?;
    raw.send(&publish(s, Some(b"_INBOX.\xff\xfe"), None, b""))
        .await?;
    raw.send(&publish(s, None, None, b"")).await?;
    raw.flush().await?;
    // Still answering, still running jobs.
    let reply = nats.request(subject, Bytes::new()).await?;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    assert_eq!(v["status"]["status"], "running");
    let client = Client::new(nats, Subjects::default());
    let r = client
        .schedule(
            &ProcessId::new("hx")?,
            Bytes::from("x"),
            &Schedule::default(),
        )
        .await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    wait_final(&js, "g13", 1, 30).await?;
    assert_eq!(lines(&out), vec![format!("hx:{}", r.slot)]);
    assert!(js.get_stream("TS_LOG").await.is_ok(), "the log is gone");
    Ok(())
}

/// A hung handler is ended by the job timeout (its child killed) and the attempt
/// fails; with the attempts used up the job is dead, the reason says why; the
/// instance goes on with the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_is_ended_by_its_timeout() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(85))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let script = format!(
        "b=$(cat); [ \"$b\" = hang ] && sleep 60; echo \"$TS_PROCESS:$TS_SLOT\" >> {}",
        out.display()
    );
    let _a = spawn_worker(
        &server,
        "g14",
        &script,
        &[
            "--job-timeout-ms",
            "700",
            "--max-attempts",
            "2",
            "--backoff-ms",
            "100",
            "--concurrency",
            "1",
        ],
    )?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let client = Client::new(nats, Subjects::default());
    let p = ProcessId::new("hung")?;
    let hung = client
        .schedule(&p, Bytes::from("hang"), &Schedule::default())
        .await?;
    let next = client
        .schedule(&p, Bytes::from("fine"), &Schedule::default())
        .await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let r = wait_final(&js, "g14", 2, 30).await?;
    let evs = &r[&format!("hung:{}", hung.slot)];
    let states: Vec<State> = evs.iter().map(|e| e.state).collect();
    assert_eq!(states, vec![State::Failed, State::Dead], "{evs:?}");
    assert!(
        evs.iter().all(|e| e
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("timed out after 700 ms"))),
        "{evs:?}"
    );
    assert!(
        evs.iter().all(|e| e.duration_ms.is_some_and(|d| d < 5_000)),
        "{evs:?}"
    );
    assert_eq!(lines(&out), vec![format!("hung:{}", next.slot)]);
    Ok(())
}

/// The data of the worker instances' STATS endpoints, one object per instance that
/// answered within a second.
async fn worker_stats(nats: &async_nats::Client) -> Result<Vec<serde_json::Value>> {
    let answers =
        service::ask_all(nats, "STATS", "turnstile-worker", Duration::from_secs(1)).await?;
    Ok(answers
        .iter()
        .filter_map(|v| {
            v["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e["data"].clone())
                .find(|d| d.get("feed_preloaded").is_some())
        })
        .collect())
}

/// A feeder that takes over reads every process checkpoint at once: the processes it
/// meets again cost no read of the log or of their checkpoint, and no job is lost or
/// run twice across the handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_feeder_preloads_every_checkpoint_in_one_read() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(79))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let mut a = spawn_worker(&server, "gp", &appender(&out), &[])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let client = Client::new(nats.clone(), Subjects::default());
    let mut ids = schedule_many(&client, 8, 10, "first").await?;
    wait_final(&js, "gp", 80, 60).await?;
    let first = worker_stats(&nats).await?;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        first[0]["feed_loads"], 8,
        "a new group meets each process once: {first:?}"
    );
    // The checkpoint covers everything fed (written every second).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let exited = tokio::task::spawn_blocking(move || a.terminate(Duration::from_secs(15))).await?;
    assert!(exited, "the instance did not exit on SIGTERM");
    let _b = spawn_worker(&server, "gp", &appender(&out), &[])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    ids.extend(schedule_many(&client, 8, 5, "second").await?);
    let r = wait_final(&js, "gp", 120, 60).await?;
    let stats = worker_stats(&nats).await?;
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(stats[0]["feed_preloaded"], 8, "{stats:?}");
    assert_eq!(stats[0]["feed_loads"], 0, "{stats:?}");
    assert_eq!(stats[0]["feed_log_reads"], 0, "{stats:?}");
    let ran = lines(&out);
    assert_eq!(ran.len(), ids.len(), "a job ran twice or not at all");
    assert_eq!(ran.into_iter().collect::<BTreeSet<_>>(), ids);
    assert_eq!(r.keys().cloned().collect::<BTreeSet<_>>(), ids);
    Ok(())
}

/// A scheduler and an unordered instance of `group`, paused, with `per` jobs queued in
/// each of processes w0 and w1 (their ids, `process:slot`): a group about to switch
/// its ordering.
struct PausedGroup {
    server: NatsServer,
    _dir: tempfile::TempDir,
    _scheduler: harness::Process,
    nats: async_nats::Client,
    out: std::path::PathBuf,
    unordered: Option<harness::Process>,
    op: String,
    group: String,
    per: u64,
    ids: BTreeSet<String>,
}

/// The flags of a strict instance.
const STRICT: [&str; 4] = ["--lease-ms", "2000", "--ordering", "strict"];

impl PausedGroup {
    async fn start(group: &str, seed: u8, per: u64) -> Result<PausedGroup> {
        let server = server()?;
        let dir = tempfile::tempdir()?;
        let key = key_file(dir.path(), &test_key(seed))?;
        let scheduler = spawn_scheduler(&server, &key, &[])?;
        let nats = connect(server.url()).await?;
        wait_for_schedulers(&nats, 1).await?;
        let out = dir.path().join("out");
        let unordered = spawn_worker(&server, group, &appender(&out), &[])?;
        wait_for_service(&nats, "turnstile-worker", 1).await?;
        let op = server.url_as(Role::Operator);
        crate::support::cli_ok(&op, &["queue", "pause", group]).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let client = Client::new(nats.clone(), Subjects::default());
        let ids = schedule_many(&client, 2, per as usize, group).await?;
        Ok(PausedGroup {
            server,
            _dir: dir,
            _scheduler: scheduler,
            nats,
            out,
            unordered: Some(unordered),
            op,
            group: group.to_string(),
            per,
            ids,
        })
    }

    /// The group's unordered consumer, by name.
    fn consumer(&self) -> String {
        format!("group-{}", self.group)
    }

    /// A strict instance started now: how it ended (within 30 s) and what it said.
    async fn strict_ends(&self) -> Result<(std::process::ExitStatus, String)> {
        let out = appender(&self.out);
        let r = run_to_its_end(&self.server, &self.group, &out, &STRICT).await?;
        assert!(lines(&self.out).is_empty(), "a job ran while paused");
        Ok(r)
    }

    /// Stops the unordered instance (its held jobs handed back).
    async fn stop_unordered(&mut self) -> Result<()> {
        if let Some(mut w) = self.unordered.take() {
            let stopped =
                tokio::task::spawn_blocking(move || w.terminate(Duration::from_secs(20))).await?;
            assert!(stopped, "the unordered instance did not stop");
        }
        Ok(())
    }

    /// A strict instance takes the group over and is resumed: every job is done once,
    /// each process's in slot order, and the unordered consumer is gone.
    async fn switch_to_strict(&self) -> Result<()> {
        let _strict = spawn_worker(
            &self.server,
            &self.group,
            &appender(&self.out),
            &STRICT[2..],
        )?;
        wait_for_service(&self.nats, "turnstile-worker", 1).await?;
        crate::support::cli_ok(&self.op, &["queue", "resume", &self.group]).await?;
        let js = async_nats::jetstream::new(connect_as(&self.server, Role::Operator).await?);
        let r = wait_final(&js, &self.group, self.ids.len(), 60).await?;
        assert_eq!(r.keys().cloned().collect::<BTreeSet<_>>(), self.ids);
        for (id, evs) in &r {
            let states: Vec<State> = evs.iter().map(|e| e.state).collect();
            assert_eq!(states, vec![State::Done], "{id}: {evs:?}");
        }
        let ran = lines(&self.out);
        assert_eq!(ran.len(), self.ids.len(), "every job ran once: {ran:?}");
        for p in ["w0", "w1"] {
            let slots: Vec<u64> = ran
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("{p}:")))
                .filter_map(|s| s.parse().ok())
                .collect();
            assert_eq!(
                slots,
                (0..self.per).collect::<Vec<u64>>(),
                "{p} in slot order"
            );
        }
        let names = work_consumers(&self.server).await?;
        assert!(
            !names.contains(&self.consumer()),
            "the unordered consumer is still there: {names:?}"
        );
        Ok(())
    }
}

/// Starts an instance of `group` with `extra` flags and waits (30 s at most) for it
/// to end: how it ended and what it said on stderr.
async fn run_to_its_end(
    server: &NatsServer,
    group: &str,
    command: &str,
    extra: &[&str],
) -> Result<(std::process::ExitStatus, String)> {
    let mut cmd =
        tokio::process::Command::from(worker_command(server, group, command, extra, "warn")?);
    cmd.kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let read = tokio::spawn(async move {
        let mut said = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stderr, &mut said).await;
        said
    });
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    if status.is_err() {
        let _ = child.kill().await;
    }
    let said = String::from_utf8_lossy(&read.await?).to_string();
    let Ok(status) = status else {
        bail!("the instance did not end within 30 s: {said}");
    };
    Ok((status?, said))
}

/// The names of the work stream's consumers.
async fn work_consumers(server: &NatsServer) -> Result<Vec<String>> {
    let js = async_nats::jetstream::new(connect_as(server, Role::Operator).await?);
    let work = js.get_stream("TS_WORK").await?;
    Ok(work
        .consumer_names()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?)
}

/// A client answering every services-API INFO request for the workers with `answers`
/// (raw protocol frames: whatever bytes, headers or none), until the task is aborted.
/// It connects as `worker`, the users' responders and workers: any of them may
/// answer there.
async fn info_forger(
    server: &NatsServer,
    answers: Vec<(Option<Vec<u8>>, Vec<u8>)>,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut raw = crate::raw::RawClient::connect(&server.url_as(Role::Worker)).await?;
    raw.subscribe("$SRV.INFO", 1).await?;
    raw.subscribe("$SRV.INFO.turnstile-worker", 2).await?;
    raw.flush().await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(asked) = raw.collect(1, Duration::from_secs(1)).await else {
                return;
            };
            for m in asked {
                let Some(reply) = &m.reply else { continue };
                for (header, body) in &answers {
                    let frame = crate::raw::publish(reply, None, header.as_deref(), body);
                    if raw.send(&frame).await.is_err() {
                        return;
                    }
                }
            }
        }
    }))
}

/// Any users' responder (user `worker`) can answer the services API's INFO for the
/// workers. Answers that
/// are not INFO (bytes that are not JSON, JSON that is not an object, a status
/// message, an object without an id) are skipped; a forged INFO of a live instance of
/// the other ordering can only keep a new instance from switching the group's
/// ordering (it ends, naming the forged id), never make it remove consumers in use.
/// Once the forger is gone, the switch happens and every job runs once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_info_answers_only_block_an_ordering_switch() -> Result<()> {
    let mut g = PausedGroup::start("of", 99, 4).await?;
    g.stop_unordered().await?;
    assert!(work_consumers(&g.server).await?.contains(&g.consumer()));

    let garbage: Vec<(Option<Vec<u8>>, Vec<u8>)> = vec![
        (None, b"\xff\xfe not json".to_vec()),
        (None, b"[1, 2, 3]".to_vec()),
        (None, b"{}".to_vec()),
        (None, br#"{"id": 7, "metadata": "group"}"#.to_vec()),
        (Some(b"NATS/1.0 503\r\n\r\n".to_vec()), Vec::new()),
        (
            Some(b"NATS/1.0\r\nbroken header\r\n\r\n".to_vec()),
            b"{".to_vec(),
        ),
        (None, vec![b'{'; 100_000]),
    ];
    let mut forged = garbage.clone();
    forged.push((
        None,
        serde_json::to_vec(&serde_json::json!({
            "id": "forged-1", "name": "turnstile-worker", "type": "io.nats.micro.v1.info_response",
            "metadata": {"group": "of", "ordering": "unordered"}
        }))?,
    ));
    let forger = info_forger(&g.server, forged).await?;
    let (status, said) = g.strict_ends().await?;
    forger.abort();
    assert!(
        !status.success(),
        "a strict instance switched the group: {said}"
    );
    assert!(
        said.contains("group of runs with --ordering unordered (live instances: forged-1)"),
        "{said}"
    );
    assert!(
        work_consumers(&g.server).await?.contains(&g.consumer()),
        "a forged answer made an instance remove the group's consumer"
    );

    // Garbage alone blocks nothing: the switch goes through.
    let forger = info_forger(&g.server, garbage).await?;
    g.switch_to_strict().await?;
    forger.abort();
    Ok(())
}

/// A group has one ordering: a strict instance started beside a live unordered one
/// ends at once with one clear line (and the live one goes on); once the unordered
/// instance has stopped, a strict one takes the group over — the old consumer is
/// removed — and every job the old one held runs once, in slot order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_has_one_ordering_and_can_switch_once_its_instances_are_gone() -> Result<()> {
    let mut g = PausedGroup::start("oc", 98, 5).await?;
    let (refused, said) = g.strict_ends().await?;
    assert!(!refused.success(), "a strict instance joined: {said}");
    assert!(
        said.contains("group oc runs with --ordering unordered (live instances: "),
        "{said}"
    );
    g.stop_unordered().await?;
    g.switch_to_strict().await
}

/// A job held by an instance across a server restart may have been delivered again
/// elsewhere (a killed server can lose the record of a delivery) and recorded there:
/// the instance reads its history before it runs it and, finding it final, acks and
/// skips it. Here the "elsewhere" is a `done` written into the results while the job
/// waits in a paused queue; the server is then killed and restarted under the instance.
/// A second job, whose history holds a failed first attempt, runs as attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_held_across_a_server_restart_is_looked_up_before_it_runs() -> Result<()> {
    let mut server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(84))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let _a = spawn_worker(&server, "g13", &appender(&out), &[])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let op = operator_env(&server);
    crate::support::cli_ok(&op, &["queue", "pause", "g13"]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("hx")?;
    let held = client
        .schedule(&p, Bytes::from("once"), &Schedule::default())
        .await?;
    let id = format!("hx:{}", held.slot);
    // A second job, whose history says its first attempt failed elsewhere.
    let q = ProcessId::new("hy")?;
    let again = client
        .schedule(&q, Bytes::from("again"), &Schedule::default())
        .await?;
    let again_id = format!("hy:{}", again.slot);
    let instance = only_instance(&nats).await?;
    // The instance holds both (paused); their work messages are read as stored.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (v, pending) = inspect(&nats, &instance).await?;
        if pending.contains(&id) && pending.contains(&again_id) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the instance never held {id} and {again_id}: {v}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let js = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    let read_job = |process: &ProcessId| {
        let (js, process) = (js.clone(), process.clone());
        async move {
            // The process's job among what its partition's subject holds.
            let mut stream = js.get_stream("TS_WORK").await?;
            let state = stream.info().await?.state.clone();
            for seq in state.first_sequence..=state.last_sequence {
                let Ok(m) = stream.get_raw_message(seq).await else {
                    continue;
                };
                let job = worker::job::Job::decode(&m.payload)?;
                if job.process == process.as_str() {
                    return anyhow::Ok(job);
                }
            }
            bail!("no job of {process} in the work stream")
        }
    };
    let job = read_job(&p).await?;
    let failed = ResultEvent::of(&read_job(&q).await?, State::Failed, 1, 1, "elsewhere");
    js.publish(
        Subjects::default().result("g13", &q, again.slot),
        Bytes::from(serde_json::to_vec(&failed)?),
    )
    .await?
    .await?;
    // Another instance's record of it, as if it had been delivered there and run.
    let done = ResultEvent::of(&job, State::Done, 1, 1, "elsewhere");
    js.publish(
        Subjects::default().result("g13", &p, held.slot),
        Bytes::from(serde_json::to_vec(&done)?),
    )
    .await?
    .await?;

    server.kill();
    server.restart_in_place()?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    crate::support::cli_ok(&op, &["queue", "resume", "g13"]).await?;
    // The first is acked and skipped (its history is the one record); the second
    // runs as its second attempt, the one after its history's last.
    let work = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = work
            .get_stream("TS_WORK")
            .await?
            .info()
            .await?
            .state
            .messages;
        if info == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{id} was never acknowledged ({info} work messages left)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lines(&out), vec![again_id.clone()], "what ran");
    let r = wait_final(&work, "g13", 2, 20).await?;
    let states: Vec<State> = r[&id].iter().map(|e| e.state).collect();
    assert_eq!(states, vec![State::Done], "{:?}", r[&id]);
    let attempts: Vec<(State, u32)> = r[&again_id].iter().map(|e| (e.state, e.attempt)).collect();
    assert_eq!(
        attempts,
        vec![(State::Failed, 1), (State::Done, 2)],
        "{:?}",
        r[&again_id]
    );
    Ok(())
}

/// The id of the live instance of `turnstile-worker` that answers PING first (empty
/// when none does).
pub(crate) async fn only_instance(nats: &async_nats::Client) -> Result<String> {
    Ok(crate::support::ping_instances(nats, "turnstile-worker")
        .await?
        .into_iter()
        .next()
        .unwrap_or_default())
}

/// Makes the work stream before any instance does, with a duplicate window of `window`
/// (an instance opens it as it is).
async fn work_stream_with_window(
    js: &async_nats::jetstream::Context,
    window: Duration,
) -> Result<()> {
    let options = journal::setup::LogOptions::default();
    let mut work = journal::setup::work_stream_config(&Subjects::default(), &options);
    work.duplicate_window = window;
    js.create_stream(work).await?;
    Ok(())
}

/// Rewinds `group`'s feed to where the group started, as a feeder killed before its
/// first checkpoint round leaves it: the sequence to its first value, the points of
/// `processes` gone.
async fn rewind_feed(
    js: &async_nats::jetstream::Context,
    group: &str,
    processes: &[&str],
) -> Result<()> {
    let kv = js.get_key_value("TS_WORKERS").await?;
    let key = format!("feed.{group}");
    let first = kv
        .history(&key)
        .await?
        .next()
        .await
        .context("the feed checkpoint has no history")??;
    kv.put(&key, first.value).await?;
    for p in processes {
        kv.purge(format!("feed.{group}.{p}")).await?;
    }
    Ok(())
}

/// A feeder that resumes from a checkpoint hands out again what was fed after it; the
/// work stream drops those copies only within its duplicate window (here 1 s, the work
/// stream made before the group: 10 minutes in a deployment). A copy handed out later
/// (every instance down for longer) was a first delivery and ran again. Now the
/// feeder marks what the log held when it resumed, and the instance reads each marked
/// job's history first: every job ran once. The checkpoints are rewound to where the
/// group started (as a feeder killed before its first checkpoint round leaves them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_handed_out_again_after_the_duplicate_window_do_not_run_again() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(80))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    work_stream_with_window(&js, Duration::from_secs(1)).await?;
    let out = dir.path().join("out");
    let mut a = spawn_worker(&server, "gr", &appender(&out), &[])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let ids = schedule_many(&client, 2, 5, "rf").await?;
    wait_final(&js, "gr", ids.len(), 60).await?;
    assert!(tokio::task::spawn_blocking(move || a.terminate(Duration::from_secs(15))).await?);
    rewind_feed(&js, "gr", &["w0", "w1"]).await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let _a2 = spawn_worker(&server, "gr", &appender(&out), &[])?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let instance = only_instance(&nats).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (v, _) = inspect(&nats, &instance).await?;
        if v["counts"]["already_final"].as_u64() >= Some(ids.len() as u64) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the jobs handed out again were not all found final: {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ran = lines(&out);
    assert_eq!(ran.len(), ids.len(), "a job ran again: {ran:?}");
    let r = results(&js, "gr").await?;
    for (id, evs) in &r {
        let states: Vec<State> = evs.iter().map(|e| e.state).collect();
        assert_eq!(states, vec![State::Done], "{id}: {evs:?}");
    }
    Ok(())
}

/// The same hand-out again into a dropbox: each job already done comes back (marked)
/// and waits, paused, beside a newer job with its merge key, which merges it away. A
/// job already final is not recorded `merged` after its `done` (its history is read
/// first): every history of the first round stays one `done`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_done_and_handed_out_again_is_not_merged_after_its_end() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(81))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    work_stream_with_window(&js, Duration::from_secs(1)).await?;
    let out = dir.path().join("out");
    let flags = ["--buffer", "dropbox"];
    let mut a = spawn_worker(&server, "gd", &appender(&out), &flags)?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("dp")?;
    let keyed = |i: usize| Schedule {
        headers: vec![("Merge-Key".into(), format!("k{i}"))],
        ..Default::default()
    };
    let mut first = Vec::new();
    for i in 0..4 {
        first.push(
            client
                .schedule(&p, Bytes::from(format!("a{i}")), &keyed(i))
                .await?
                .slot,
        );
        wait_final(&js, "gd", i + 1, 30).await?;
    }
    assert!(tokio::task::spawn_blocking(move || a.terminate(Duration::from_secs(15))).await?);
    rewind_feed(&js, "gd", &["dp"]).await?;
    // Newer jobs with the same keys, then the group paused: all wait in the buffer.
    let mut second = Vec::new();
    for i in 0..4 {
        second.push(
            client
                .schedule(&p, Bytes::from(format!("b{i}")), &keyed(i))
                .await?
                .slot,
        );
    }
    let op = operator_env(&server);
    crate::support::cli_ok(&op, &["queue", "pause", "gd"]).await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let _a2 = spawn_worker(&server, "gd", &appender(&out), &flags)?;
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let instance = only_instance(&nats).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (v, pending) = inspect(&nats, &instance).await?;
        if pending.len() == second.len() && v["counts"]["already_final"].as_u64() >= Some(4) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the instance never held the second round alone: {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    crate::support::cli_ok(&op, &["queue", "resume", "gd"]).await?;
    let r = wait_final(&js, "gd", first.len() + second.len(), 30).await?;
    for slot in first.iter().chain(&second) {
        let evs = &r[&format!("dp:{slot}")];
        let states: Vec<State> = evs.iter().map(|e| e.state).collect();
        assert_eq!(states, vec![State::Done], "dp:{slot}: {evs:?}");
    }
    assert_eq!(lines(&out).len(), first.len() + second.len());
    Ok(())
}
