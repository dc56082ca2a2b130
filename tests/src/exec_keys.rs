//! Execution keys: jobs with the same `Ts-Execution-Key` never run at the same time
//! anywhere in the cluster and all run; different keys run at once; a key held by an
//! instance that died frees after its lease, and the dead holder's token is stale;
//! header values that are not keys are refused at the scheduler.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Result};
use bytes::Bytes;
use harness::Role;
use journal::client::{Client, Schedule};
use journal::subjects::{exec_key_name, Subjects};
use protocol::ProcessId;
use worker::job::State;

use crate::raw::{publish, RawClient};
use crate::support::{
    connect, connect_as, key_file, read_log, server, spawn_scheduler, test_key,
    wait_for_schedulers, wait_for_service,
};
use crate::workers::{lines, spawn_worker, wait_final};

fn with_key(key: &str) -> Schedule {
    Schedule {
        headers: vec![("Ts-Execution-Key".into(), key.into())],
        ..Default::default()
    }
}

/// One line of the handlers' file: `start|end|met <key> <job> [token] [pid] [ms]`.
fn parse(line: &str) -> (String, String, String, Vec<String>) {
    let mut w = line.split(' ').map(str::to_string);
    let kind = w.next().unwrap_or_default();
    let key = w.next().unwrap_or_default();
    let job = w.next().unwrap_or_default();
    (kind, key, job, w.collect())
}

/// Reads the file in the order the handlers appended to it (appends are atomic and
/// ordered): no key has two jobs started without the first one's end between them.
/// Returns, per key, the tokens of its starts in order. `dead`: a job whose run was
/// killed with its instance (its start has no end; its child died with it).
fn no_overlap(out: &Path, dead: Option<&str>) -> Result<BTreeMap<String, Vec<u64>>> {
    let mut dead = dead.map(str::to_string);
    let mut open: BTreeMap<String, String> = BTreeMap::new();
    let mut tokens: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in lines(out) {
        let (kind, key, job, rest) = parse(&line);
        match kind.as_str() {
            "start" => {
                if let Some(other) = open.insert(key.clone(), job.clone()) {
                    if dead.as_ref() == Some(&other) {
                        dead = None;
                        let token = rest.first().and_then(|t| t.parse::<u64>().ok());
                        tokens.entry(key).or_default().extend(token);
                        continue;
                    }
                    bail!(
                        "{job} started while {other} held key {key}: {:?}",
                        lines(out)
                    );
                }
                let token = rest.first().and_then(|t| t.parse::<u64>().ok());
                let Some(token) = token else {
                    bail!("{job} ran without a fencing token: {line}");
                };
                tokens.entry(key).or_default().push(token);
            }
            "end" => {
                ensure!(
                    open.remove(&key).as_deref() == Some(job.as_str()),
                    "{job} ended key {key} it did not start: {:?}",
                    lines(out)
                );
            }
            _ => {}
        }
    }
    Ok(tokens)
}

/// Two instances, one group: ten jobs of one key over five processes never overlap
/// anywhere and all run, each with a greater token than the one before; two jobs of
/// two other keys run at the same time (each waits, bounded, to see the other start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_with_one_key_never_overlap_across_instances_and_other_keys_run_at_once() -> Result<()>
{
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(91))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let o = out.display();
    let script = format!(
        "b=$(cat); k=\"$TS_HEADER_TS_EXECUTION_KEY\"; j=\"$TS_PROCESS:$TS_SLOT\"; \
         echo \"start $k $j ${{TS_EXECUTION_TOKEN:-none}}\" >> {o}; \
         case \"$b\" in \
           rv-*) other=\"${{b#rv-}}\"; i=0; \
                 while [ $i -lt 200 ] && ! grep -q \"^start $other \" {o}; do sleep 0.05; i=$((i+1)); done; \
                 if grep -q \"^start $other \" {o}; then echo \"met $k $j\" >> {o}; fi ;; \
           *) sleep 0.1 ;; \
         esac; \
         echo \"end $k $j\" >> {o}"
    );
    let extra = ["--exec-key-lease-ms", "3000", "--concurrency", "4"];
    let _a = spawn_worker(&server, "xk1", &script, &extra)?;
    let _b = spawn_worker(&server, "xk1", &script, &extra)?;
    wait_for_service(&nats, "turnstile-worker", 2).await?;
    let client = Client::new(nats, Subjects::default());
    let mut ids = BTreeSet::new();
    for i in 0..10 {
        let p = ProcessId::new(format!("xp{}", i % 5))?;
        let r = client
            .schedule(&p, Bytes::from(format!("job {i}")), &with_key("K"))
            .await?;
        ids.insert(format!("{p}:{}", r.slot));
    }
    for (k, other) in [("X", "Y"), ("Y", "X")] {
        let p = ProcessId::new(format!("rv{k}"))?;
        let r = client
            .schedule(&p, Bytes::from(format!("rv-{other}")), &with_key(k))
            .await?;
        ids.insert(format!("{p}:{}", r.slot));
    }
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let r = wait_final(&js, "xk1", ids.len(), 90).await?;
    assert_eq!(r.keys().cloned().collect::<BTreeSet<_>>(), ids);
    for (id, evs) in &r {
        let states: Vec<State> = evs.iter().map(|e| e.state).collect();
        assert_eq!(states, vec![State::Done], "{id}: {evs:?}");
    }
    let tokens = no_overlap(&out, None)?;
    let k = tokens.get("K").cloned().unwrap_or_default();
    assert_eq!(k.len(), 10, "every job of K ran once: {:?}", lines(&out));
    assert!(
        k.windows(2).all(|w| w[0] < w[1]),
        "tokens grow from holder to holder: {k:?}"
    );
    let met: BTreeSet<String> = lines(&out)
        .iter()
        .filter(|l| l.starts_with("met "))
        .map(|l| parse(l).1)
        .collect();
    assert_eq!(
        met,
        BTreeSet::from(["X".to_string(), "Y".to_string()]),
        "jobs of different keys ran at the same time: {:?}",
        lines(&out)
    );
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The instance running a job of key K is SIGKILLed while a second job of K waits:
/// the second runs only once the dead holder's lease has run out (not at the kill),
/// with a greater token; the dead holder's token is no longer the key's, and a
/// compare-and-set on the key with a revision it knew is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_held_by_a_killed_instance_frees_after_its_lease_and_its_token_is_stale() -> Result<()>
{
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(92))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let mark = dir.path().join("slow-once");
    // The slow job sleeps on its first run only (its second run, after the kill, ends
    // at once).
    let script = format!(
        "b=$(cat); echo \"start K $TS_PROCESS:$TS_SLOT ${{TS_EXECUTION_TOKEN:-none}} $PPID $(date +%s%3N)\" >> {o}; \
         if [ \"$b\" = slow ] && [ ! -e {m} ]; then touch {m}; sleep 60; fi; \
         echo \"end K $TS_PROCESS:$TS_SLOT\" >> {o}",
        o = out.display(),
        m = mark.display()
    );
    let extra = [
        "--exec-key-lease-ms",
        "3000",
        "--ack-wait-ms",
        "3000",
        "--concurrency",
        "4",
    ];
    let mut a = spawn_worker(&server, "xk2", &script, &extra)?;
    let mut b = spawn_worker(&server, "xk2", &script, &extra)?;
    wait_for_service(&nats, "turnstile-worker", 2).await?;
    let client = Client::new(nats, Subjects::default());
    let slow = client
        .schedule(&ProcessId::new("ka")?, Bytes::from("slow"), &with_key("K"))
        .await?;
    let slow_id = format!("ka:{}", slow.slot);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (t1, pid) = loop {
        if let Some(l) = lines(&out).first() {
            let (_, _, _, rest) = parse(l);
            let t1 = rest.first().and_then(|t| t.parse::<u64>().ok());
            let pid = rest.get(1).and_then(|p| p.parse::<u32>().ok());
            match (t1, pid) {
                (Some(t), Some(p)) => break (t, p),
                _ => bail!("no token or pid in {l}"),
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the slow job never started");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let fast = client
        .schedule(&ProcessId::new("kb")?, Bytes::from("fast"), &with_key("K"))
        .await?;
    let fast_id = format!("kb:{}", fast.slot);
    // While the holder lives (and renews), the second job waits.
    tokio::time::sleep(Duration::from_secs(4)).await;
    ensure!(
        !lines(&out).iter().any(|l| l.contains(&fast_id)),
        "the second job of K started while the first ran: {:?}",
        lines(&out)
    );
    let killed_ms = now_ms();
    if Some(pid) == a.pid() {
        a.kill();
    } else if Some(pid) == b.pid() {
        b.kill();
    } else {
        bail!("the slow job's parent {pid} is neither instance");
    }
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let r = wait_final(&js, "xk2", 2, 90).await?;
    for id in [&slow_id, &fast_id] {
        let evs = r.get(id.as_str()).cloned().unwrap_or_default();
        assert_eq!(
            evs.iter().filter(|e| e.state == State::Done).count(),
            1,
            "{id}: {evs:?}"
        );
    }
    let all = lines(&out);
    let fast_start = all
        .iter()
        .map(|l| parse(l))
        .find(|(kind, _, job, _)| kind == "start" && *job == fast_id)
        .ok_or_else(|| anyhow::anyhow!("the second job never started: {all:?}"))?;
    let t2: u64 = fast_start
        .3
        .first()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let at: u64 = fast_start
        .3
        .get(2)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(t2 > t1, "the next holder's token {t2} is greater than {t1}");
    eprintln!(
        "the second job of K started {} ms after its holder was killed (lease 3 s)",
        at as i64 - killed_ms as i64
    );
    // The dead holder's last renewal was at most a third of the lease (1 s) before the
    // kill, so its key lived at least 2 s after it.
    assert!(
        at >= killed_ms + 1_500,
        "the second job started {} ms after the kill, before the dead holder's lease ran out",
        at as i64 - killed_ms as i64
    );
    // Every start of K, in file order, has no overlap and a greater token than the last.
    let tokens = no_overlap(&out, Some(&slow_id))?;
    let k = tokens.get("K").cloned().unwrap_or_default();
    assert_eq!(k.len(), 3, "the slow job twice, the fast one once: {all:?}");
    assert!(k.windows(2).all(|w| w[0] < w[1]), "{k:?}");
    // The dead holder's token is stale: not the key's lease, and a write expecting a
    // revision it could know (its own acquiring one) is refused.
    let store = js.get_key_value("TS_EXEC_KEYS").await?;
    let locks = ownership::keyed::Locks::new(js.clone(), store, Duration::from_secs(3)).await?;
    let name = exec_key_name("K");
    assert!(!locks.is_current(&name, ownership::Token(t1)).await?);
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        "Nats-Expected-Last-Subject-Sequence",
        t1.to_string().as_str(),
    );
    let refused = js
        .publish_with_headers(format!("$KV.TS_EXEC_KEYS.{name}"), h, Bytes::from("{}"))
        .await?
        .await;
    assert!(
        refused.is_err(),
        "a write fenced by the dead holder's token landed"
    );
    Ok(())
}

/// `Ts-Execution-Key` values that are not keys (empty, too long, control characters,
/// two different values) are refused `malformed` and nothing is written; a key of the
/// longest length is stored with the message, whatever case its name was sent in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_execution_keys_are_refused_at_the_scheduler() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(93))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let mut raw = RawClient::connect(server.url()).await?;
    raw.subscribe("_INBOX.xk.>", 1).await?;
    let long = "k".repeat(257);
    let longest = "k".repeat(256);
    let bad: Vec<Vec<u8>> = vec![
        b"NATS/1.0\r\nTs-Execution-Key:\r\n\r\n".to_vec(),
        format!("NATS/1.0\r\nTs-Execution-Key: {long}\r\n\r\n").into_bytes(),
        b"NATS/1.0\r\nTs-Execution-Key: a\x01b\r\n\r\n".to_vec(),
        b"NATS/1.0\r\nTs-Execution-Key: a\tb\r\n\r\n".to_vec(),
        b"NATS/1.0\r\nTs-Execution-Key: a\r\nts-execution-key: b\r\n\r\n".to_vec(),
        b"NATS/1.0\r\nTs-Execution-Keys: a\r\n\r\n".to_vec(),
    ];
    for (i, h) in bad.iter().enumerate() {
        let reply = format!("_INBOX.xk.{i}");
        raw.send(&publish(
            b"ts.schedule.hx",
            Some(reply.as_bytes()),
            Some(h),
            b"x",
        ))
        .await?;
    }
    let good = format!("NATS/1.0\r\nts-execution-key: {longest}\r\n\r\n");
    raw.send(&publish(
        b"ts.schedule.hx",
        Some(b"_INBOX.xk.good"),
        Some(good.as_bytes()),
        b"x",
    ))
    .await?;
    let answers = raw.collect(bad.len() + 1, Duration::from_secs(10)).await?;
    assert_eq!(answers.len(), bad.len() + 1, "every request answered");
    for m in &answers {
        let subject = String::from_utf8_lossy(&m.subject).to_string();
        let error = m.header("Ts-Error");
        if subject.ends_with(".good") {
            assert_eq!(error, None, "the longest key is accepted");
        } else {
            assert_eq!(error.as_deref(), Some("malformed"), "{subject}");
        }
    }
    let entries = read_log(server.url(), &ProcessId::new("hx")?).await?;
    assert_eq!(entries.len(), 1, "only the good request was written");
    assert_eq!(
        entries[0].headers,
        vec![("Ts-Execution-Key".to_string(), longest)],
        "stored under its canonical name"
    );
    Ok(())
}

/// The holder of K is stopped (SIGSTOP) past its lease while its job's child goes on:
/// the key expires, a job of K waiting elsewhere runs with a greater token and makes a
/// fenced write; the stopped job's child, waking, is refused by the same fence (its
/// token is smaller); its instance, resumed, finds its lease lost and records the
/// attempt failed, and the retry runs under a new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stalled_past_its_lease_is_fenced_off_and_its_attempt_fails() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(94))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let mark = dir.path().join("slow-once");
    let fence = dir.path().join("fence");
    // The resource keeps the greatest token it accepted and refuses smaller ones.
    let script = format!(
        "b=$(cat); t=${{TS_EXECUTION_TOKEN:-0}}; j=\"$TS_PROCESS:$TS_SLOT\"; \
         echo \"start K $j $t $PPID\" >> {o}; \
         if [ \"$b\" = slow ] && [ ! -e {m} ]; then touch {m}; sleep 7; fi; \
         g=$(cat {f} 2>/dev/null || echo 0); \
         if [ \"$t\" -ge \"$g\" ]; then echo \"$t\" > {f}; echo \"wrote K $j $t\" >> {o}; \
         else echo \"refused K $j $t\" >> {o}; fi",
        o = out.display(),
        m = mark.display(),
        f = fence.display()
    );
    let extra = [
        "--exec-key-lease-ms",
        "3000",
        "--ack-wait-ms",
        "30000",
        "--backoff-ms",
        "200",
    ];
    let a = spawn_worker(&server, "xk3", &script, &extra)?;
    let b = spawn_worker(&server, "xk3", &script, &extra)?;
    wait_for_service(&nats, "turnstile-worker", 2).await?;
    let client = Client::new(nats, Subjects::default());
    let slow = client
        .schedule(&ProcessId::new("sa")?, Bytes::from("slow"), &with_key("K"))
        .await?;
    let slow_id = format!("sa:{}", slow.slot);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (t1, pid) = loop {
        if let Some(l) = lines(&out).first() {
            let (_, _, _, rest) = parse(l);
            match (
                rest.first().and_then(|t| t.parse::<u64>().ok()),
                rest.get(1).and_then(|p| p.parse::<u32>().ok()),
            ) {
                (Some(t), Some(p)) => break (t, p),
                _ => bail!("no token or pid in {l}"),
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the slow job never started");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(
        Some(pid) == a.pid() || Some(pid) == b.pid(),
        "the slow job's parent {pid} is neither instance"
    );
    let stop = |sig: &str| {
        std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
    };
    ensure!(stop("STOP")?.success(), "SIGSTOP");
    // Scheduled while the holder is stopped: the other instance takes it.
    let fast = client
        .schedule(&ProcessId::new("sb")?, Bytes::from("fast"), &with_key("K"))
        .await?;
    let fast_id = format!("sb:{}", fast.slot);
    tokio::time::sleep(Duration::from_secs(8)).await;
    ensure!(stop("CONT")?.success(), "SIGCONT");
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let r = wait_final(&js, "xk3", 2, 60).await?;
    let all = lines(&out);
    let find = |kind: &str, job: &str| {
        all.iter()
            .map(|l| parse(l))
            .find(|(k, _, j, _)| k == kind && j == job)
            .and_then(|(_, _, _, rest)| rest.first().and_then(|t| t.parse::<u64>().ok()))
    };
    let t2 = find("wrote", &fast_id);
    assert!(
        t2.is_some_and(|t2| t2 > t1),
        "the waiting job ran while the holder was stopped, with a greater token: {all:?}"
    );
    assert_eq!(
        find("refused", &slow_id),
        Some(t1),
        "the stalled holder's write was refused by the fence: {all:?}"
    );
    let evs = r.get(slow_id.as_str()).cloned().unwrap_or_default();
    assert!(
        evs.iter()
            .any(|e| e.state == State::Failed
                && e.reason.as_deref().is_some_and(|r| r.contains("lost"))),
        "the stalled attempt is recorded failed, its lease lost: {evs:?}"
    );
    assert_eq!(evs.last().map(|e| e.state), Some(State::Done), "{evs:?}");
    let t3 = all
        .iter()
        .map(|l| parse(l))
        .filter(|(k, _, j, _)| k == "wrote" && *j == slow_id)
        .find_map(|(_, _, _, rest)| rest.first().and_then(|t| t.parse::<u64>().ok()));
    assert!(
        t3.is_some_and(|t3| Some(t3) > t2),
        "the retry holds a newer lease: {all:?}"
    );
    Ok(())
}

/// A strict group with bounded buffers of two: half the jobs of four processes share
/// the key K, the others have none. Every job is done (a parked job neither deadlocks
/// a full buffer nor is lost), each process runs one job at a time in slot order (a
/// job waiting for K holds back its process), and K's jobs never overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_a_strict_group_with_bounded_buffers_keep_slot_order_and_all_run() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(95))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let out = dir.path().join("out");
    let script = format!(
        "j=\"$TS_PROCESS:$TS_SLOT\"; \
         if [ -n \"$TS_HEADER_TS_EXECUTION_KEY\" ]; then \
           echo \"start K $j $TS_EXECUTION_TOKEN\" >> {o}; sleep 0.05; echo \"end K $j\" >> {o}; \
         else echo \"free - $j\" >> {o}; sleep 0.05; echo \"done - $j\" >> {o}; fi",
        o = out.display()
    );
    let extra = [
        "--ordering",
        "strict",
        "--buffer",
        "bounded:2",
        "--concurrency",
        "4",
        "--exec-key-lease-ms",
        "3000",
    ];
    let _a = spawn_worker(&server, "xk4", &script, &extra)?;
    let _b = spawn_worker(&server, "xk4", &script, &extra)?;
    wait_for_service(&nats, "turnstile-worker", 2).await?;
    let client = Client::new(nats, Subjects::default());
    let mut tasks = Vec::new();
    for p in 0..4 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let process = ProcessId::new(format!("sk{p}"))?;
            for i in 0..6 {
                let opts = if i % 2 == 0 {
                    with_key("K")
                } else {
                    Schedule::default()
                };
                client
                    .schedule(&process, Bytes::from(format!("{i}")), &opts)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let operator = connect_as(&server, Role::Operator).await?;
    let js = async_nats::jetstream::new(operator);
    let r = wait_final(&js, "xk4", 24, 90).await?;
    for (id, evs) in &r {
        let states: Vec<State> = evs.iter().map(|e| e.state).collect();
        assert_eq!(states, vec![State::Done], "{id}: {evs:?}");
    }
    let tokens = no_overlap(&out, None)?;
    assert_eq!(tokens.get("K").map(Vec::len), Some(12), "{:?}", lines(&out));
    let all = lines(&out);
    for p in 0..4 {
        let name = format!("sk{p}");
        let mine: Vec<(bool, u64)> = all
            .iter()
            .map(|l| parse(l))
            .filter_map(|(kind, _, job, _)| {
                let (proc_, slot) = job.split_once(':')?;
                let begin = kind == "start" || kind == "free";
                (proc_ == name).then(|| (begin, slot.parse().unwrap_or(u64::MAX)))
            })
            .collect();
        let expected: Vec<(bool, u64)> = (0..6u64).flat_map(|k| [(true, k), (false, k)]).collect();
        assert_eq!(mine, expected, "process {name}: {all:?}");
    }
    Ok(())
}

/// A job that runs past `--job-timeout-ms` is cancelled and fails at once, but its
/// handler may not stop at once (a library handler may ignore the token): its
/// execution key stays held until the handler has returned, so a second job of the key
/// starts only then — not at the timeout, beside the first one's handler. An in-process
/// instance whose handler ignores its cancellation and runs 1.5 s past a 300 ms timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_job_keeps_its_key_until_its_handler_has_returned() -> Result<()> {
    let server = server()?;
    let dir = tempfile::tempdir()?;
    let key = key_file(dir.path(), &test_key(97))?;
    let _s = spawn_scheduler(&server, &key, &[])?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    // (slot, start ms, end ms) of every handler run.
    let runs: Arc<Mutex<Vec<(u64, u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&runs);
    let handler: Arc<dyn worker::handler::Handler> = Arc::new(
        move |job: worker::job::Job, _cancel: tokio_util::sync::CancellationToken| {
            let seen = Arc::clone(&seen);
            async move {
                let start = now_ms();
                // Deaf to its cancellation.
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                if let Ok(mut r) = seen.lock() {
                    r.push((job.slot, start, now_ms()));
                }
                worker::handler::Outcome::Done
            }
        },
    );
    let settings = worker::Settings {
        prefix: "ts".into(),
        replicas: 1,
        serves: worker::feeder::Serves::All,
        from: worker::feeder::From::Start,
        instance: worker::instance::Config {
            group: "xto".into(),
            max_attempts: 1,
            job_timeout: Duration::from_millis(300),
            exec_key_lease: Duration::from_secs(3),
            ..Default::default()
        },
        lease: Duration::from_secs(2),
        trusted: None,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let instance = tokio::spawn(worker::run(
        settings,
        worker::Connections {
            core: connect_as(&server, Role::JobWorker).await?,
            intake: Some(connect_as(&server, Role::Worker).await?),
            events: Arc::new(service::ConnectionEvents::default()),
        },
        handler,
        shutdown.clone(),
        service::system_clock(),
    ));
    wait_for_service(&nats, "turnstile-worker", 1).await?;
    let client = Client::new(nats, Subjects::default());
    let p = ProcessId::new("xto1")?;
    let mut ids = BTreeSet::new();
    for i in 0..2 {
        let r = client
            .schedule(&p, Bytes::from(format!("job {i}")), &with_key("T"))
            .await?;
        ids.insert(format!("{p}:{}", r.slot));
    }
    let js = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    let r = wait_final(&js, "xto", ids.len(), 60).await?;
    for (id, evs) in &r {
        let states: Vec<State> = evs.iter().map(|e| e.state).collect();
        assert_eq!(states, vec![State::Dead], "{id} timed out: {evs:?}");
    }
    // Both handlers have returned (the second one's key is let go after it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen: Vec<(u64, u64, u64)> = Vec::new();
    while tokio::time::Instant::now() < deadline {
        seen = runs.lock().map(|r| r.clone()).unwrap_or_default();
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    let _ = instance.await;
    seen.sort_by_key(|r| r.1);
    let [a, b] = seen.as_slice() else {
        bail!("two handler runs, not {seen:?}");
    };
    assert!(
        b.1 >= a.2,
        "job {} started at {} while the timed-out job {} ran until {} (key T)",
        b.0,
        b.1,
        a.0,
        a.2
    );
    Ok(())
}
