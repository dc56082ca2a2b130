//! Shared set-up for system tests and the benchmark.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use harness::NatsServer;
pub use harness::Role;
use journal::audit::{self, Report, Scope};
use journal::client::{Client, Schedule};
use journal::reader::{LogReader, StoredRun};
use journal::subjects::Subjects;
use protocol::keys::Keypair;
use protocol::verify::{Fault, TrustedKeys};
use protocol::wire::{Entry, ErrorCode, Receipt};
use protocol::ProcessId;
use scheduler::{Config, Keyring};

/// A deterministic key for tests (seed `[n; 32]`).
pub fn test_key(n: u8) -> Keypair {
    Keypair::from_seed([n; 32])
}

/// Writes `key` to a file in `dir` and returns its path.
pub fn key_file(dir: &std::path::Path, key: &Keypair) -> Result<PathBuf> {
    let path = dir.join(format!("{}.json", key.id()));
    std::fs::write(&path, key.to_key_file())?;
    Ok(path)
}

/// Connects to `url` (or to any of several, comma-separated: a cluster's), as the user
/// and password inside it if any (`NatsServer::url_as`, `NatsCluster::url_as`).
pub async fn connect(url: &str) -> Result<async_nats::Client> {
    let (url, credentials) = harness::split_url_credentials(url);
    let options = match credentials {
        Some((user, password)) => {
            async_nats::ConnectOptions::new().user_and_password(user, password)
        }
        None => async_nats::ConnectOptions::new(),
    };
    // async-nats takes a comma-separated string as one (invalid) address.
    let addrs: Vec<&str> = url.split(',').collect();
    Ok(options.connect(addrs).await?)
}

/// Returns once the server has processed everything `nats` sent before: its
/// subscriptions above all. `flush` only writes the socket, so a message another
/// connection publishes right after it can reach the server before the SUB does and
/// go to no one (seen on a loaded CI machine). The barrier is a request that the
/// server itself answers (no responders) after what came before it on the connection.
pub async fn settled(nats: &async_nats::Client) -> Result<()> {
    let subject = format!("{}.settle", nats.new_inbox());
    let request = async_nats::Request::new()
        .payload(Bytes::new())
        .timeout(Some(Duration::from_secs(20)));
    match nats.send_request(subject, request).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Err(e) => Err(anyhow::anyhow!("the server did not answer a barrier: {e}")),
    }
}

/// Connects to `server` as `role`.
pub async fn connect_as(server: &NatsServer, role: Role) -> Result<async_nats::Client> {
    connect(&server.url_as(role)).await
}

/// A scheduler running inside the test process, with its own NATS connection.
pub struct InProcess {
    shutdown: CancellationToken,
    handle: JoinHandle<scheduler::Result<()>>,
}

impl InProcess {
    /// Starts a scheduler on `server` with `config`, signing with `keys`: its core
    /// connection as [`Role::Scheduler`], its intake as [`Role::SchedulerIntake`].
    pub async fn start(
        server: &NatsServer,
        config: Config,
        keys: Vec<Keypair>,
    ) -> Result<InProcess> {
        let connections = connections(server).await?;
        let shutdown = CancellationToken::new();
        let keyring = Keyring::new(keys)?;
        let handle = tokio::spawn(scheduler::run(
            config,
            keyring,
            connections,
            shutdown.clone(),
        ));
        Ok(InProcess { shutdown, handle })
    }

    /// Stops it gracefully and returns how it ended.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.handle.await?.map_err(|e| anyhow!(e))
    }
}

/// Runs the `turnstile` CLI with `args` against `url` (as the user inside it, if any)
/// and waits for it, at most 60 s.
pub async fn turnstile(url: &str, args: &[&str]) -> Result<std::process::Output> {
    let out = tokio::process::Command::new(harness::workspace_bin("turnstile")?)
        .args(args)
        .env("NATS_URL", url)
        .env_remove("NATS_CREDS")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .context("turnstile did not finish within 60 s")?
        .context("running turnstile")
}

/// A CLI run's standard output, lossily decoded.
pub fn cli_stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CLI run's standard error, lossily decoded.
pub fn cli_stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the CLI against `url` and requires exit status 0; its standard output.
pub async fn cli_ok(url: &str, args: &[&str]) -> Result<String> {
    let out = turnstile(url, args).await?;
    if !out.status.success() {
        bail!("turnstile {args:?} failed: {}", show(&out));
    }
    Ok(cli_stdout(&out))
}

/// A CLI run's exit code and output, for a failing assertion's message.
pub fn show(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every decodable run of `process` as stored (nothing judged), with its stream
/// sequence, read as the operator.
pub async fn stored_runs(
    server: &NatsServer,
    process: &ProcessId,
) -> Result<Vec<(u64, protocol::wire::Run)>> {
    let js = async_nats::jetstream::new(connect_as(server, Role::Operator).await?);
    let reader = journal::reader::LogReader::open(js, Subjects::default()).await?;
    let tail = reader.last_message(process).await?.map_or(0, |m| m.seq);
    let mut messages = reader.messages(process, 1, Some(tail)).await?;
    let mut runs = Vec::new();
    while let Some(m) = messages.next().await {
        let m = m?;
        if let Ok(run) = m.decode() {
            runs.push((m.seq, run));
        }
    }
    Ok(runs)
}

/// A scheduler's connections to `server`, each under its identity.
pub async fn connections(server: &NatsServer) -> Result<scheduler::Connections> {
    let mut intake = Vec::new();
    for _ in 0..scheduler::DEFAULT_INTAKE_CONNECTIONS {
        intake.push(connect_as(server, Role::SchedulerIntake).await?);
    }
    Ok(scheduler::Connections {
        core: connect_as(server, Role::Scheduler).await?,
        intake,
        replies: Some(connect_as(server, Role::SchedulerReplies).await?),
        events: Default::default(),
    })
}

/// Waits until `n` schedulers answer the services-API PING.
pub async fn wait_for_schedulers(client: &async_nats::Client, n: usize) -> Result<()> {
    wait_for_service(client, "turnstile-scheduler", n).await
}

/// Waits until `n` distinct instances of service `name` answer the services-API PING
/// (20 s at most). Only a real PING response counts: with nobody subscribed, the
/// server answers the request itself with an empty "no responders" status message,
/// which once let a test start before its scheduler listened.
pub async fn wait_for_service(client: &async_nats::Client, name: &str, n: usize) -> Result<()> {
    for _ in 0..200 {
        if ping_instances(client, name).await?.len() >= n {
            return Ok(());
        }
    }
    bail!("fewer than {n} instances of {name} answered PING within 20 s")
}

/// The ids of the instances of service `name` that answer PING within 100 ms.
pub async fn ping_instances(
    client: &async_nats::Client,
    name: &str,
) -> Result<std::collections::BTreeSet<String>> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(format!("$SRV.PING.{name}"), inbox, Bytes::new())
        .await?;
    let mut ids = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
        if m.status.is_some() {
            continue;
        }
        let id = serde_json::from_slice::<serde_json::Value>(&m.payload)
            .ok()
            .filter(|v| v["name"] == name)
            .and_then(|v| v["id"].as_str().map(str::to_string));
        if let Some(id) = id {
            ids.insert(id);
        }
    }
    Ok(ids)
}

/// The command that starts an alarm-loader on `server` (a server or a cluster) as a
/// separate process, with its two identities ([`Role::AlarmLoader`],
/// [`Role::AlarmIntake`]), as deployed.
pub fn loader_command(server: &impl harness::Urls, extra: &[&str]) -> Result<Command> {
    let bin = harness::workspace_bin("alarm-loader")?;
    let mut cmd = Command::new(bin);
    cmd.args(extra)
        .env("NATS_URL", server.url_as(Role::AlarmLoader))
        .env("TS_INTAKE_URL", server.url_as(Role::AlarmIntake))
        .env("RUST_LOG", "warn");
    Ok(cmd)
}

/// The alarm stream of `server` opened as the operator (it reads what the loaders
/// keep there: records, due entries, the firing key).
pub async fn operator_store(server: &NatsServer) -> Result<alarm_loader::store::Store> {
    Ok(alarm_loader::store::Store::open(
        async_nats::jetstream::new(connect_as(server, Role::Operator).await?),
        journal::subjects::Subjects::default(),
        &journal::setup::LogOptions::default(),
    )
    .await?)
}

/// Runs service `cmd` (`what`), which must end by itself within 30 s (a
/// misconfiguration): how it ended and what it wrote to stderr.
pub async fn run_to_its_end(
    cmd: Command,
    what: &str,
) -> Result<(std::process::ExitStatus, String)> {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true).stdout(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .with_context(|| format!("the {what} did not end within 30 s"))??;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Starts an alarm-loader on `server` that must end by itself within 30 s (a
/// misconfiguration): how it ended and what it wrote to stderr.
pub async fn loader_that_ends(server: &NatsServer) -> Result<(std::process::ExitStatus, String)> {
    run_to_its_end(loader_command(server, &[])?, "loader").await
}

/// The command that starts a worker instance of `group` on `server` (a server or a
/// cluster) as a separate process, with its two identities ([`Role::JobWorker`],
/// [`Role::Worker`]), as deployed; its handler runs `script` with `sh -c`. Its log
/// level is `$TS_TEST_WORKER_LOG`, else `log`.
pub fn worker_command(
    server: &impl harness::Urls,
    group: &str,
    script: &str,
    extra: &[&str],
    log: &str,
) -> Result<Command> {
    let mut cmd = Command::new(harness::workspace_bin("worker")?);
    cmd.arg("--group")
        .arg(group)
        .args(extra)
        .arg("--command")
        .arg("sh")
        .arg("-c")
        .arg(script)
        .env("NATS_URL", server.url_as(Role::JobWorker))
        .env("TS_INTAKE_URL", server.url_as(Role::Worker))
        .env(
            "RUST_LOG",
            std::env::var("TS_TEST_WORKER_LOG").unwrap_or_else(|_| log.into()),
        );
    Ok(cmd)
}

/// Starts a scheduler on `server` (a server or a cluster) as a separate process (so a
/// test can SIGKILL it), with its three identities ([`Role::Scheduler`],
/// [`Role::SchedulerIntake`], [`Role::SchedulerReplies`]), as deployed.
pub fn spawn_scheduler(
    server: &impl harness::Urls,
    key: &std::path::Path,
    extra: &[&str],
) -> Result<harness::Process> {
    Ok(harness::Process::spawn(scheduler_command(
        server, key, extra,
    )?)?)
}

/// The command [`spawn_scheduler`] runs, for a caller that changes it first (e.g.
/// sends its output to a file).
pub fn scheduler_command(
    server: &impl harness::Urls,
    key: &std::path::Path,
    extra: &[&str],
) -> Result<Command> {
    let bin = harness::workspace_bin("scheduler")?;
    let mut cmd = Command::new(bin);
    cmd.arg("--key")
        .arg(key)
        .args(extra)
        .env("NATS_URL", server.url_as(Role::Scheduler))
        .env("TS_INTAKE_URL", server.url_as(Role::SchedulerIntake))
        .env("TS_REPLIES_URL", server.url_as(Role::SchedulerReplies))
        .env("RUST_LOG", "warn");
    Ok(cmd)
}

/// Schedules with retries on the failures a client should retry (no responders,
/// timeouts, `unavailable`), keeping the same message id so a retry is idempotent.
pub async fn schedule_retrying(
    client: &Client,
    process: &ProcessId,
    body: Bytes,
    opts: &Schedule,
) -> Result<Receipt> {
    let mut last = None;
    for attempt in 0..60 {
        match client.schedule(process, body.clone(), opts).await {
            Ok(r) => return Ok(r),
            Err(journal::Error::NoResponders(_) | journal::Error::Timeout(_)) => {}
            Err(journal::Error::Refused {
                code: ErrorCode::Unavailable,
                ..
            }) => {}
            Err(e) => return Err(e).context("scheduling"),
        }
        last = Some(attempt);
        tokio::time::sleep(Duration::from_millis(100 + 50 * attempt.min(10))).await;
    }
    bail!("still failing after {last:?} retries")
}

/// Every entry of `process`'s log, in log order.
pub async fn read_log(url: &str, process: &ProcessId) -> Result<Vec<Entry>> {
    let js = async_nats::jetstream::new(connect(url).await?);
    let trusted = published_keys(&js).await?;
    let reader = LogReader::open(js, Subjects::default()).await?;
    let (runs, _) = read_runs(&reader, &trusted, process).await?;
    Ok(runs.into_iter().flat_map(|r| r.run.entries).collect())
}

/// Every run of `process`'s chain, in log order, judged with `trusted` keys, and
/// every fault met on the way (foreign messages, losses).
pub async fn read_runs(
    reader: &LogReader,
    trusted: &TrustedKeys,
    process: &ProcessId,
) -> Result<(Vec<StoredRun>, Vec<Fault>)> {
    let mut judged = journal::chain::from_slot(reader, process, trusted, 0, false).await?;
    let (mut runs, mut faults) = (Vec::new(), Vec::new());
    while let Some(j) = judged.next().await {
        match j? {
            journal::chain::Judged::Chain { run, lost } => {
                faults.extend(lost);
                runs.push(run);
            }
            journal::chain::Judged::Foreign(fault) => faults.push(fault),
        }
    }
    Ok((runs, faults))
}

/// The keys published in the deployment's keys bucket.
pub async fn published_keys(js: &async_nats::jetstream::Context) -> Result<TrustedKeys> {
    let store = journal::setup::open_bucket(js, &Subjects::default().keys_bucket()).await?;
    Ok(journal::keyring::trust(
        &journal::keyring::fetch(&store).await?,
    ))
}

/// Verifies `process`'s whole log against `keys`.
pub async fn verify(url: &str, process: &ProcessId, keys: &[&Keypair]) -> Result<Report> {
    let js = async_nats::jetstream::new(connect(url).await?);
    let reader = LogReader::open(js, Subjects::default()).await?;
    let mut trusted = TrustedKeys::default();
    for k in keys {
        trusted.insert(k.public_key());
    }
    let scope = Scope {
        process: process.clone(),
        from: 0,
        to: None,
        required: vec![],
    };
    Ok(audit::verify(&reader, &scope, trusted, |_| {}).await?)
}

/// Asserts that `entries` hold slots `0..n` in order, each message id exactly once,
/// and that these are exactly `expected_ids`.
pub fn assert_exactly_once(entries: &[Entry], expected_ids: &HashSet<String>) {
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(
            e.slot, i as u64,
            "slot {} at position {i}: a gap or a repeat",
            e.slot
        );
    }
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for e in entries {
        *count.entry(e.message_id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "message ids scheduled more than once: {twice:?}"
    );
    let got: HashSet<String> = count.keys().map(|s| s.to_string()).collect();
    let missing: Vec<_> = expected_ids.difference(&got).collect();
    let extra: Vec<_> = got.difference(expected_ids).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, unexpected {extra:?}"
    );
}

/// Runs `clients` concurrent clients, each scheduling `per_client` messages with
/// `window` requests in flight, ids `c<i>-m<j>`; returns every receipt.
pub async fn load(
    url: &str,
    process: &ProcessId,
    clients: usize,
    per_client: usize,
    window: usize,
) -> Result<Vec<Receipt>> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let nats = connect(url).await?;
        let client =
            Arc::new(Client::new(nats, Subjects::default()).with_timeout(Duration::from_secs(2)));
        let process = process.clone();
        tasks.push(tokio::spawn(async move {
            let results: Vec<Result<Receipt>> = futures::stream::iter(0..per_client)
                .map(|m| {
                    let client = Arc::clone(&client);
                    let process = process.clone();
                    async move {
                        let opts = Schedule {
                            message_id: Some(format!("c{c}-m{m}")),
                            ..Default::default()
                        };
                        schedule_retrying(
                            &client,
                            &process,
                            Bytes::from(format!("client {c} message {m}")),
                            &opts,
                        )
                        .await
                    }
                })
                .buffer_unordered(window)
                .collect()
                .await;
            results.into_iter().collect::<Result<Vec<_>>>()
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// A fresh server plus the default test key.
pub fn server() -> Result<NatsServer> {
    Ok(NatsServer::start()?)
}

/// Sums the `schedule` endpoint counters (`$SRV.STATS`) of `n` schedulers.
pub async fn scheduler_counters(url: &str, n: usize) -> Result<BTreeMap<String, u64>> {
    let client = connect(url).await?;
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply("$SRV.STATS.turnstile-scheduler", inbox, Bytes::new())
        .await?;
    let mut totals = BTreeMap::new();
    for _ in 0..n {
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await?
            .context("stats reply")?;
        let v: serde_json::Value = serde_json::from_slice(&msg.payload)?;
        let schedule = v["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "schedule")
            .cloned()
            .unwrap_or_default();
        for (k, c) in schedule["data"].as_object().into_iter().flatten() {
            *totals.entry(k.clone()).or_default() += c.as_u64().unwrap_or(0);
        }
    }
    Ok(totals)
}

/// Asserts that `result` is a refusal with `code`.
pub fn assert_refused<T: std::fmt::Debug>(result: Result<T, journal::Error>, code: ErrorCode) {
    match result {
        Err(journal::Error::Refused { code: got, .. }) if got == code => {}
        other => panic!("expected a {} refusal, got {other:?}", code.as_str()),
    }
}

/// Scheduling options that only set the mode.
pub fn with_mode(mode: protocol::wire::Mode) -> Schedule {
    Schedule {
        mode: Some(mode),
        ..Default::default()
    }
}

/// Replaces `from` with `to` (same length) in every file under `dir`; returns how many
/// places changed.
pub fn patch_files(dir: &std::path::Path, from: &[u8], to: &[u8]) -> anyhow::Result<usize> {
    assert_eq!(from.len(), to.len());
    let mut changed = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            changed += patch_files(&path, from, to)?;
            continue;
        }
        let mut bytes = std::fs::read(&path)?;
        let mut hits = 0;
        let mut i = 0;
        while i + from.len() <= bytes.len() {
            if &bytes[i..i + from.len()] == from {
                bytes[i..i + from.len()].copy_from_slice(to);
                hits += 1;
            }
            i += 1;
        }
        if hits > 0 {
            std::fs::write(&path, bytes)?;
            changed += hits;
        }
    }
    Ok(changed)
}

/// What the results stream holds for a worker group: every event of every job, by job
/// id (`<process>:<slot>`), in order, and the fault events (their subjects).
#[derive(Debug, Default)]
pub struct JobResults {
    /// Every job's events, in order.
    pub jobs: BTreeMap<String, Vec<worker::job::ResultEvent>>,
    /// The subjects of the fault events (a foreign message the feeder met).
    pub faults: Vec<String>,
}

/// Reads every event of `group` in the results stream (`TS_RESULTS`, as the operator).
pub async fn job_results(js: &async_nats::jetstream::Context, group: &str) -> Result<JobResults> {
    let stream = js.get_stream(Subjects::default().results_stream()).await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("ts.result.{group}.>"),
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending;
    let mut out = JobResults::default();
    if pending == 0 {
        return Ok(out);
    }
    let mut msgs = consumer.messages().await?;
    let mut n = 0;
    while let Some(m) = msgs.next().await {
        let m = m?;
        n += 1;
        if m.subject.ends_with(".fault") {
            out.faults.push(m.subject.to_string());
        } else {
            let ev: worker::job::ResultEvent = serde_json::from_slice(&m.payload)?;
            out.jobs
                .entry(format!("{}:{}", ev.process, ev.slot))
                .or_default()
                .push(ev);
        }
        if n >= pending {
            break;
        }
    }
    Ok(out)
}
