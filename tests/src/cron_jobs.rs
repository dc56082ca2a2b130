//! Cron jobs in the alarm-loader against a real nats-server and scheduler: one
//! execution per tick across loaders, overlap and deletion skips, missed ticks after
//! an outage, and broadcast to every instance of a worker group.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use harness::Role;
use protocol::ProcessId;
use scheduler::Config;

use crate::alarms::{now_ms, spawn_loader, wait_for_loaders, wait_status};
use crate::support::{connect, connect_as, read_log, server, settled, test_key, InProcess};

/// One cron request; the JSON answer, or the `Ts-Error` code.
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

/// The loaders' summed STATS data.
async fn loader_stats(client: &async_nats::Client) -> Result<BTreeMap<String, u64>> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply("$SRV.STATS.turnstile-alarm-loader", inbox, Bytes::new())
        .await?;
    let mut out = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
        let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        for ep in v["endpoints"].as_array().into_iter().flatten().take(1) {
            for (k, n) in ep["data"].as_object().into_iter().flatten() {
                if let Some(n) = n.as_u64() {
                    *out.entry(k.clone()).or_default() += n;
                }
            }
        }
    }
    Ok(out)
}

/// The tick (ms) each log entry of `process` came from, by its message id
/// `alarm-cron-<job>-<tick>-<set_seq>-<due>-<tag>`.
async fn ticks_in_log(url: &str, process: &str, job: &str) -> Result<Vec<u64>> {
    let prefix = format!("alarm-cron-{job}-");
    let mut ticks = Vec::new();
    for e in read_log(url, &ProcessId::new(process)?).await? {
        let rest = e
            .message_id
            .strip_prefix(&prefix)
            .with_context(|| format!("not a tick of {job}: {}", e.message_id))?;
        let tick = rest.split('-').next().unwrap_or("").parse::<u64>()?;
        ticks.push(tick);
    }
    Ok(ticks)
}

/// Three loaders plan and fire one job; one is killed (SIGKILL) while it ticks: every
/// tick is in the log exactly once, a second apart, none missing (the dead loader's
/// ticks fire late, within the job's missed-run grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_job_fires_once_per_tick_across_three_loaders_one_killed() -> Result<()> {
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut loaders = [
        spawn_loader(&server)?,
        spawn_loader(&server)?,
        spawn_loader(&server)?,
    ];
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 3).await?;
    crate::alarms::wait_for_partitions(&client, 3).await?;
    let added = cron(&client, "add", json!({
        "name": "beat", "schedule": "@every 1s", "target": {"process": "cronned"}, "body": "dGljaw=="
    }))
    .await?
    .map_err(anyhow::Error::msg)?;
    assert_eq!(added["replaced"], false);
    assert_eq!(added["next"].as_array().map(Vec::len), Some(5));
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    loaders[0].kill();
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    let off = cron(&client, "deactivate", json!({"name": "beat"}))
        .await?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(off["active"], false);
    let deactivated = now_ms();
    // Let what was due (the dead loader's partitions move after its 2 s lease) finish.
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    let mut ticks = ticks_in_log(server.url(), "cronned", "beat").await?;
    let fired = ticks.len();
    ticks.sort_unstable();
    ticks.dedup();
    assert_eq!(ticks.len(), fired, "a tick fired twice: {ticks:?}");
    assert!(ticks.len() >= 6, "about seven ticks in 7.5 s: {ticks:?}");
    for w in ticks.windows(2) {
        assert_eq!(
            w[1] - w[0],
            1_000,
            "ticks a second apart, none missing: {ticks:?}"
        );
    }
    assert!(
        ticks.last().is_some_and(|&t| t + 1_500 >= deactivated),
        "the ticks went on to the end: {ticks:?}"
    );
    let got = cron(&client, "get", json!({"name": "beat"}))
        .await?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(got["job"]["active"], false);
    assert!(got["last_planned_ms"].as_u64() >= ticks.last().copied());
    // Inactive: no tick fires any more (those planned are skipped, recorded).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        ticks_in_log(server.url(), "cronned", "beat").await?.len(),
        fired
    );
    let listed = cron(&client, "list", json!({}))
        .await?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(listed["jobs"][0]["name"], "beat");
    assert_eq!(
        cron(&client, "get", json!({"name": "nope"})).await?,
        Err("not_found".into())
    );
    assert_eq!(
        cron(
            &client,
            "add",
            json!({"name": "x", "schedule": "61 * * * * *", "target": {"process": "p"}})
        )
        .await?,
        Err("invalid_alarm".into())
    );
    for l in &mut loaders[1..] {
        l.terminate(Duration::from_secs(10));
    }
    sched.stop().await?;
    Ok(())
}

/// A job that skips overlapping ticks, against a responder slower than its period:
/// ticks while one runs are skipped (recorded), never run at once; after the job is
/// deleted no tick fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_ticks_are_skipped_and_a_deleted_job_fires_no_more() -> Result<()> {
    let server = server()?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let worker = connect_as(&server, Role::Worker).await?;
    let mut sub = worker.subscribe("jobs.slow").await?;
    settled(&worker).await?;
    let responder = tokio::spawn(async move {
        let mut calls = Vec::new();
        while let Some(m) = sub.next().await {
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Ts-Alarm-Id"))
                .map(|v| v.to_string());
            calls.push((now_ms(), id));
            // Slower than the period: the next ticks come while this one runs.
            tokio::time::sleep(Duration::from_millis(2_200)).await;
            if let Some(r) = m.reply {
                let _ = worker
                    .publish(r, Bytes::from_static(br#"{"result":"ok"}"#))
                    .await;
                let _ = worker.flush().await;
            }
            if calls.len() == 2 {
                return calls;
            }
        }
        calls
    });
    cron(
        &client,
        "add",
        json!({
            "name": "slow", "schedule": "@every 1s", "overlap": "skip",
            "target": {"subject": "jobs.slow"}, "dispatch_timeout_ms": 5000
        }),
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    let calls = tokio::time::timeout(Duration::from_secs(15), responder).await??;
    assert_eq!(calls.len(), 2);
    // The second call began after the first answered (2.2 s), not a second later.
    assert!(calls[1].0 - calls[0].0 >= 2_000, "{calls:?}");
    let deleted = cron(&client, "delete", json!({"name": "slow"}))
        .await?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(deleted["deleted"], true);
    // A tick between the two calls was skipped for the overlap, and says so.
    let first: u64 = calls[0]
        .1
        .as_deref()
        .and_then(|id| id.rsplit('-').next())
        .context("tick id")?
        .parse()?;
    let skipped = wait_status(
        &client,
        &format!("cron-slow-{}", first + 1_000),
        "skipped",
        10,
    )
    .await?;
    assert!(
        skipped["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("overlap")),
        "{skipped}"
    );
    assert_eq!(
        cron(&client, "get", json!({"name": "slow"})).await?,
        Err("not_found".into())
    );
    let stats = loader_stats(&client).await?;
    assert!(stats.get("skipped").copied().unwrap_or(0) >= 1, "{stats:?}");
    loader.terminate(Duration::from_secs(10));
    Ok(())
}

/// The alarms of `job`'s ticks `first, first + period, …` up to `until` that exist:
/// (tick, status, the status's reason and time if it has them).
async fn tick_alarms(
    client: &async_nats::Client,
    job: &str,
    first: u64,
    period: u64,
    until: u64,
) -> Result<Vec<(u64, String, String, u64)>> {
    let mut out = Vec::new();
    let mut t = first;
    while t <= until {
        let id = format!("cron-{job}-{t}");
        if let Ok(got) = crate::alarms::alarm(client, "get", json!({"id": id})).await? {
            let status = &got["status"];
            out.push((
                t,
                status["status"].as_str().unwrap_or("").to_string(),
                status["reason"].as_str().unwrap_or("").to_string(),
                status["at_ms"].as_u64().unwrap_or(0),
            ));
        }
        t += period;
    }
    Ok(out)
}

/// Ticks that fell while every loader was down follow each job's missed-run policy:
/// `skip` fires none of them, `latest` the newest (none if by the time it fires a
/// later tick is due within the grace, which fires instead), `all` every one; each
/// job goes on afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_missed_during_an_outage_follow_the_policy() -> Result<()> {
    let server = server()?;
    let sched = InProcess::start(&server, Config::default(), vec![test_key(1)]).await?;
    let mut a = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    // `latest` ticks every 3 s, so that the 7 s outage holds two or three of its ticks
    // and the newest is not always overtaken by a tick within the 1 s grace.
    let jobs = [("skip", 1_000), ("latest", 3_000), ("all", 1_000)];
    let mut created = BTreeMap::new();
    for (policy, period) in jobs {
        let added = cron(
            &client,
            "add",
            json!({
                "name": format!("gap-{policy}"), "schedule": format!("@every {}s", period / 1000),
                "missed": policy, "missed_grace_ms": 1000, "missed_bound": 10,
                "target": {"process": format!("gapped-{policy}")}
            }),
        )
        .await?
        .map_err(anyhow::Error::msg)?;
        let got = cron(&client, "get", json!({"name": format!("gap-{policy}")}))
            .await?
            .map_err(anyhow::Error::msg)?;
        let at = got["job"]["created_ms"]
            .as_u64()
            .with_context(|| format!("no created_ms: {got} ({added})"))?;
        created.insert(policy, at);
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    a.kill();
    let down_at = now_ms();
    // Back 1.5 s after a tick of `latest` (its ticks are `created + k × 3 s`), at
    // least 6 s later: that tick is then late past the grace, and the next one not yet
    // due, so latest fires it (unless the new loader takes over 1.5 s to fire).
    let anchor = created["latest"];
    let back = {
        let earliest = down_at + 6_000;
        let k = (earliest.saturating_sub(anchor + 1_500)).div_ceil(3_000);
        anchor + 1_500 + k * 3_000
    };
    tokio::time::sleep(Duration::from_millis(back.saturating_sub(now_ms()))).await;
    let up_at = now_ms();
    let mut b = spawn_loader(&server)?;
    wait_for_loaders(&client, 1).await?;
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    let mut seen = BTreeMap::new();
    for (policy, period) in jobs {
        let job = format!("gap-{policy}");
        let ticks = ticks_in_log(server.url(), &format!("gapped-{policy}"), &job).await?;
        let distinct: BTreeSet<u64> = ticks.iter().copied().collect();
        assert_eq!(distinct.len(), ticks.len(), "{policy}: {ticks:?}");
        let last = distinct.last().copied().unwrap_or(0);
        assert!(last > up_at, "{policy}: the job went on: {ticks:?}");
        // The ticks of the outage: due after the killed loader could have fired them
        // and more than the grace before one ran again. Each has an alarm (planned
        // ahead) or none (dropped when planning resumed).
        let first = last - (last - down_at) / period * period;
        let outage: Vec<(u64, String, String, u64)> =
            tick_alarms(&client, &job, first, period, last)
                .await?
                .into_iter()
                .filter(|(t, ..)| *t + 1_100 < up_at)
                .collect();
        let fired: Vec<u64> = distinct
            .iter()
            .copied()
            .filter(|&t| t > down_at && t + 1_100 < up_at)
            .collect();
        seen.insert(policy, (distinct, outage, fired));
    }
    let skipped_by = |outage: &[(u64, String, String, u64)], policy: &str| {
        outage
            .iter()
            .filter(|(_, s, r, _)| s == "skipped" && r.contains(&format!("policy {policy}")))
            .count()
    };
    // skip: none of the outage's ticks fired; those planned ahead say why.
    let (_, outage, fired) = &seen["skip"];
    assert!(
        fired.is_empty() && skipped_by(outage, "skip") == outage.len(),
        "skip: {fired:?} fired; {outage:?} (down {down_at}, up {up_at})"
    );
    // latest: the newest of the outage's ticks fired and the others were skipped for
    // it; or, if the new loader came to it only once the tick after it was due (so
    // within the grace), it was skipped too and that one fired.
    let (latest, outage, fired) = &seen["latest"];
    let (older, newest) = match outage.as_slice() {
        [older @ .., newest] => (older, newest),
        [] => panic!("latest: no tick of the outage has an alarm; log {latest:?}"),
    };
    assert!(
        skipped_by(older, "latest") == older.len(),
        "latest: {outage:?}; log {latest:?} (down {down_at}, up {up_at})"
    );
    let (t, status, _, at) = newest;
    if status == "done" {
        assert_eq!(fired, &[*t], "latest: {outage:?}; log {latest:?}");
    } else {
        assert!(
            fired.is_empty()
                && skipped_by(std::slice::from_ref(newest), "latest") == 1
                && *at >= t + 3_000
                && latest.contains(&(t + 3_000)),
            "latest: the newest tick of the outage did not fire: {outage:?}; log {latest:?} \
             (down {down_at}, up {up_at})"
        );
    }
    // all: every tick of the run is in the log, none missing.
    let (all, outage, fired) = &seen["all"];
    let all: Vec<u64> = all.iter().copied().collect();
    let gaps: Vec<&[u64]> = all.windows(2).filter(|w| w[1] - w[0] != 1000).collect();
    assert!(
        gaps.is_empty() && fired.len() >= 4 && outage.iter().all(|(_, s, ..)| s == "done"),
        "all: ticks missing between {gaps:?}: {all:?}; {outage:?}"
    );
    let stats = loader_stats(&client).await?;
    // Dropped as missed when planning resumed, or skipped as late at fire time when
    // they had been planned before the outage: either way by the policy, and said.
    let by_policy =
        stats.get("cron_missed").copied().unwrap_or(0) + stats.get("skipped").copied().unwrap_or(0);
    assert!(by_policy >= 6, "{stats:?}");
    b.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

/// Strategy `all`: every live instance of a worker group gets each tick, on its own
/// subject, with the same firing id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategy_all_sends_each_tick_to_every_instance() -> Result<()> {
    let server = server()?;
    let mut loader = spawn_loader(&server)?;
    let client = connect(server.url()).await?;
    wait_for_loaders(&client, 1).await?;
    let mut instances = Vec::new();
    for id in ["w1", "w2"] {
        let nats = connect_as(&server, Role::Worker).await?;
        let mut ping = nats.subscribe("$SRV.PING.pool").await?;
        let mut work = nats.subscribe(format!("jobs.pool.{id}")).await?;
        settled(&nats).await?;
        instances.push(tokio::spawn(async move {
            let mut firings = Vec::new();
            loop {
                tokio::select! {
                    Some(m) = ping.next() => {
                        if let Some(r) = m.reply {
                            let _ = nats.publish(r, serde_json::to_vec(&json!({"name": "pool", "id": id})).unwrap_or_default().into()).await;
                        }
                    }
                    Some(m) = work.next() => {
                        firings.push(m.headers.as_ref().and_then(|h| h.get("Ts-Alarm-Firing")).map(|v| v.to_string()).unwrap_or_default());
                        if let Some(r) = m.reply {
                            let _ = nats.publish(r, Bytes::new()).await;
                        }
                        if firings.len() == 2 {
                            return firings;
                        }
                    }
                    else => return firings,
                }
            }
        }));
    }
    cron(
        &client,
        "add",
        json!({
            "name": "bcast", "schedule": "@every 1s", "strategy": {"all": "pool"},
            "target": {"subject": "jobs.pool"}
        }),
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    let mut seen = Vec::new();
    for i in instances {
        seen.push(tokio::time::timeout(Duration::from_secs(15), i).await??);
    }
    if seen[0] != seen[1] {
        bail!("the instances saw different firings: {seen:?}");
    }
    assert!(
        seen[0].iter().all(|f| f.starts_with("alarm-cron-bcast-")),
        "{seen:?}"
    );
    let tick: u64 = seen[0][0]
        .trim_start_matches("alarm-cron-bcast-")
        .split('-')
        .next()
        .unwrap_or("")
        .parse()?;
    let done = wait_status(&client, &format!("cron-bcast-{tick}"), "done", 10).await?;
    assert_eq!(done["history"].as_array().map(Vec::len), Some(3), "{done}");
    loader.terminate(Duration::from_secs(10));
    Ok(())
}
