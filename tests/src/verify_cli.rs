//! The `turnstile` CLI's `verify` (one process, `--all`, `--json`, `--to`, exit
//! statuses) and `audit --follow`, run as the binary against a private server.

#![cfg(test)]

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, BufReader};

use harness::Role;
use journal::client::{Client, Schedule};
use journal::subjects::Subjects;
use protocol::wire::FaultEvent;
use protocol::ProcessId;
use scheduler::Config;

use crate::support::*;

async fn schedule_n(client: &Client, p: &ProcessId, n: usize) -> Result<()> {
    for i in 0..n {
        client
            .schedule(p, Bytes::from(format!("{p} {i}")), &Schedule::default())
            .await?;
    }
    Ok(())
}

/// The faults of `process` in a `verify --json` document, as (seq, code).
fn faults_of(doc: &serde_json::Value, process: &str) -> Result<Vec<(u64, String)>> {
    let entry = doc["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["process"] == process)
        .with_context(|| format!("{process} is not in the document"))?;
    Ok(entry["faults"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            (
                f["seq"].as_u64().unwrap_or(0),
                f["code"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_all_names_each_foreign_message_and_exits_by_the_verdict() -> Result<()> {
    let server = server()?;
    let url = server.url().to_string();
    let s = InProcess::start(&server, Config::default(), vec![test_key(41)]).await?;
    let nats = connect(&url).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats, Subjects::default());
    let clean = ProcessId::new("clean")?;
    let dirty = ProcessId::new("dirty")?;
    schedule_n(&client, &clean, 6).await?;
    schedule_n(&client, &dirty, 6).await?;

    // With full rights, after dirty's head: a genuine run replayed, then garbage.
    let js = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    let runs = stored_runs(&server, &dirty).await?;
    let replayed = &runs.get(1).context("dirty has runs")?.1;
    let replay_seq = js
        .publish_with_headers(
            "ts.log.dirty",
            journal::reader::RunMeta::headers_of(replayed),
            replayed.encode()?.into(),
        )
        .await?
        .await?
        .sequence;
    let garbage_seq = js
        .publish("ts.log.dirty", Bytes::from_static(b"\x93\x01\x02garbage"))
        .await?
        .await?
        .sequence;

    let out = turnstile(&url, &["verify", "--all", "--json"]).await?;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).context(show(&out))?;
    assert_eq!(
        faults_of(&doc, "dirty")?,
        vec![
            (replay_seq, "replayed".to_string()),
            (garbage_seq, "undecodable".to_string())
        ],
        "{doc:#}"
    );
    assert_eq!(faults_of(&doc, "clean")?, vec![], "{doc:#}");
    let by_name = |name: &str| {
        doc["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["process"] == name)
            .cloned()
            .unwrap_or_default()
    };
    for name in ["clean", "dirty"] {
        let p = by_name(name);
        assert_eq!(
            (p["checked"].as_u64(), p["last_slot"].as_u64()),
            (Some(6), Some(5)),
            "{name}: {p}"
        );
    }
    assert_eq!(doc["totals"]["processes"], 2, "{doc:#}");
    assert_eq!(doc["totals"]["assignments"], 12, "{doc:#}");
    assert_eq!(doc["totals"]["faults"], 2, "{doc:#}");
    assert_eq!(doc["ok"], false);

    // Text: each fault with its stream sequence, expected slot and code.
    let out = turnstile(&url, &["verify", "dirty"]).await?;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "stream sequence {replay_seq} (next slot 6): replayed"
        )) && text.contains(&format!(
            "stream sequence {garbage_seq} (next slot 6): undecodable"
        )),
        "{}",
        show(&out)
    );

    // The clean process alone: ok; beyond its end: a gap, never ok.
    let out = turnstile(&url, &["verify", "clean"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok: clean slots 0..=5"),
        "{}",
        show(&out)
    );
    let out = turnstile(&url, &["verify", "clean", "--to", "5"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = turnstile(
        &url,
        &["verify", "clean", "--from", "2", "--to", "6", "--json"],
    )
    .await?;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).context(show(&out))?;
    let faults = faults_of(&doc, "clean")?;
    assert_eq!(
        faults.iter().map(|f| f.1.as_str()).collect::<Vec<_>>(),
        vec!["gap"],
        "{doc:#}"
    );

    // Nothing listens there: a connection error, exit 2.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let out = turnstile(&format!("nats://127.0.0.1:{port}"), &["verify", "--all"]).await?;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    // A usage error: exit 2 too.
    let out = turnstile(&url, &["verify"]).await?;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    s.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_follow_prints_each_fault_event_as_it_comes() -> Result<()> {
    let server = server()?;
    let mut child = tokio::process::Command::new(harness::workspace_bin("turnstile")?)
        .args(["audit", "--follow", "--json"])
        .env("NATS_URL", server.url())
        .env_remove("NATS_CREDS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stderr = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
    // It has subscribed once it says so.
    let ready = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stderr.next_line().await? {
            if line.contains("following fault events") {
                return Ok::<_, anyhow::Error>(());
            }
        }
        bail!("turnstile audit ended before following")
    })
    .await
    .context("turnstile audit did not start following")?;
    ready?;

    let event = FaultEvent {
        v: 1,
        process: "victim".into(),
        seq: 17,
        slot: 12,
        code: "replayed".into(),
        message: "replayed: written after stream sequence 3, found after 16".into(),
        detected_by: "scheduler".into(),
        time_ms: 1_700_000_000_000,
    };
    let publisher = connect_as(&server, Role::Scheduler).await?;
    publisher
        .publish("ts.events.fault", serde_json::to_vec(&event)?.into())
        .await?;
    publisher.flush().await?;
    let line = tokio::time::timeout(Duration::from_secs(20), stdout.next_line())
        .await
        .context("no event printed")??
        .context("turnstile audit ended")?;
    let got: FaultEvent = serde_json::from_str(&line).context(line.clone())?;
    assert_eq!(got, event);
    child.kill().await?;
    Ok(())
}
