//! Which keys a run must carry is decided from history (issue 8 #9): each run declares
//! the required key set it was written under, a change of the set is sealed by the
//! keys it replaces (the handover), and `turnstile verify` judges every run by the
//! log alone — never by today's settings. An honest log verifies after the required
//! keys change; a run that changes them without the old keys' seal is a fault.

#![cfg(test)]

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;

use harness::{NatsServer, Role};
use journal::client::{Client, Schedule};
use journal::subjects::Subjects;
use protocol::keys::Keypair;
use protocol::wire::{ErrorCode, Run};
use protocol::ProcessId;
use scheduler::Config;

use crate::support::*;

/// `turnstile process set <process> --keys <ids>` as the operator; it returns once
/// every live replica applied it.
async fn set_keys(server: &NatsServer, process: &str, keys: &[&Keypair]) -> Result<()> {
    let ids: Vec<&str> = keys.iter().map(|k| k.id()).collect();
    let joined = ids.join(",");
    let out = turnstile(
        &server.url_as(Role::Operator),
        &["process", "set", process, "--keys", &joined],
    )
    .await?;
    anyhow::ensure!(out.status.success(), "process set: {}", show(&out));
    Ok(())
}

/// Schedules `n` messages one after another (each its own run); returns their slots.
async fn schedule_n(client: &Client, p: &ProcessId, tag: &str, n: usize) -> Result<Vec<u64>> {
    let mut slots = Vec::new();
    for i in 0..n {
        let r = client
            .schedule(p, Bytes::from(format!("{tag} {i}")), &Schedule::default())
            .await
            .with_context(|| format!("{tag} {i}"))?;
        slots.push(r.slot);
    }
    Ok(slots)
}

fn signers(run: &Run) -> Vec<String> {
    let mut ids: Vec<String> = run
        .seal
        .commitments
        .iter()
        .map(|c| c.key_id.clone())
        .collect();
    ids.sort();
    ids
}

fn ids(keys: &[&Keypair]) -> Vec<String> {
    protocol::keys::key_set(&keys.iter().map(|k| k.id()).collect::<Vec<_>>())
}

/// The faults of a one-process `verify --json` document, as (seq, code).
fn faults(doc: &serde_json::Value) -> Vec<(u64, String)> {
    doc["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["faults"].as_array().cloned().unwrap_or_default())
        .map(|f| {
            (
                f["seq"].as_u64().unwrap_or(0),
                f["code"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_log_verifies_after_the_required_keys_change() -> Result<()> {
    let server = server()?;
    let url = server.url().to_string();
    let (k1, k2) = (test_key(61), test_key(62));
    let p = ProcessId::new("rotated")?;
    set_keys(&server, p.as_str(), &[&k1]).await?;
    // A replica that holds both keys (its default key is k1).
    let s = InProcess::start(&server, Config::default(), vec![test_key(61), test_key(62)]).await?;
    let nats = connect(&url).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    assert_eq!(schedule_n(&client, &p, "before", 3).await?, vec![0, 1, 2]);

    set_keys(&server, p.as_str(), &[&k2]).await?;
    assert_eq!(schedule_n(&client, &p, "after", 3).await?, vec![3, 4, 5]);

    // Before: declared and sealed by k1. The first run after the change declares k2
    // and is sealed by both (the handover); the runs after it by k2 alone.
    let runs = stored_runs(&server, &p).await?;
    let seen: Vec<(Option<Vec<String>>, Vec<String>)> = runs
        .iter()
        .map(|(_, r)| (r.keys.clone(), signers(r)))
        .collect();
    let (d1, d2, both) = (ids(&[&k1]), ids(&[&k2]), ids(&[&k1, &k2]));
    assert_eq!(
        seen,
        vec![
            (Some(d1.clone()), d1.clone()),
            (Some(d1.clone()), d1.clone()),
            (Some(d1.clone()), d1),
            (Some(d2.clone()), both),
            (Some(d2.clone()), d2.clone()),
            (Some(d2.clone()), d2),
        ],
        "declared keys and signers of each run"
    );

    // The log alone decides: ok, whatever the settings say now.
    let out = turnstile(&url, &["verify", p.as_str()]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok: rotated slots 0..=5"),
        "{}",
        show(&out)
    );
    // --require stays an extra demand of the verifier: k1 is not on the later runs.
    let out = turnstile(
        &url,
        &["verify", p.as_str(), "--require", k1.id(), "--json"],
    )
    .await?;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).context(show(&out))?;
    let missing: Vec<u64> = faults(&doc)
        .into_iter()
        .filter(|(_, code)| code == "missing_key")
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(
        missing,
        vec![runs[4].0, runs[5].0],
        "{doc:#}: only the runs after the handover lack k1"
    );

    // Back to k1, with a replica that holds k1 only: the run that changes the set
    // must also be sealed by k2, the key it replaces, which this replica lacks: a
    // typed refusal naming it, nothing written.
    s.stop().await?;
    set_keys(&server, p.as_str(), &[&k1]).await?;
    let only_k1 = InProcess::start(&server, Config::default(), vec![test_key(61)]).await?;
    wait_for_schedulers(&nats, 1).await?;
    match client
        .schedule(&p, Bytes::from("no handover"), &Schedule::default())
        .await
    {
        Err(journal::Error::Refused {
            code: ErrorCode::MissingKey,
            message,
        }) => assert!(
            message.contains(k2.id()) && message.contains("change"),
            "{message}"
        ),
        other => panic!("expected a missing_key refusal, got {other:?}"),
    }
    assert_eq!(stored_runs(&server, &p).await?.len(), 6, "nothing written");
    only_k1.stop().await?;
    // With both keys the change back goes through, and the log still verifies.
    let s = InProcess::start(&server, Config::default(), vec![test_key(62), test_key(61)]).await?;
    wait_for_schedulers(&nats, 1).await?;
    assert_eq!(schedule_n(&client, &p, "back", 2).await?, vec![6, 7]);
    let runs = stored_runs(&server, &p).await?;
    assert_eq!(
        runs[6]
            .1
            .keys
            .as_ref()
            .map(|k| (k.clone(), signers(&runs[6].1))),
        Some((ids(&[&k1]), ids(&[&k1, &k2])))
    );
    let out = turnstile(&url, &["verify", p.as_str()]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    s.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_without_the_old_keys_seal_is_reported_and_skipped() -> Result<()> {
    let server = server()?;
    let url = server.url().to_string();
    let (k1, k2) = (test_key(63), test_key(64));
    let p = ProcessId::new("usurped")?;
    set_keys(&server, p.as_str(), &[&k1]).await?;
    // Both keys are trusted (published by the replica), only k1 is required.
    let s = InProcess::start(&server, Config::default(), vec![test_key(63), test_key(64)]).await?;
    let nats = connect(&url).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let mut events = nats.subscribe("ts.events.fault").await?;
    assert_eq!(schedule_n(&client, &p, "before", 3).await?, vec![0, 1, 2]);

    // Someone holding k2 (trusted, but not required) writes a run that continues the
    // chain in its place and declares {k2}, sealed by k2 alone: the required key k1
    // never consented. Published with the expectation the scheduler would use.
    let (head_seq, head) = stored_runs(&server, &p)
        .await?
        .pop()
        .context("runs were written")?;
    let point = scheduler::core::Head::after(&head, head_seq);
    let (mut forged, tree) = scheduler::core::build_run(
        &p,
        &point,
        vec![scheduler::core::NewMessage {
            message_id: "usurper".into(),
            headers: vec![],
            body: b"k2 alone".to_vec(),
        }],
        head.entries[0].timestamp_ms + 1,
    );
    forged.keys = Some(ids(&[&k2]));
    let digest = protocol::seal::run_digest(&forged.statement_for(&tree));
    forged.seal = protocol::seal::seal(&[digest], &[&k2]).remove(0);
    let mut headers = journal::reader::RunMeta::headers_of(&forged);
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        head_seq.to_string().as_str(),
    );
    let js = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    let forged_seq = js
        .publish_with_headers(
            Subjects::default().log(&p),
            headers,
            forged.encode()?.into(),
        )
        .await?
        .await?
        .sequence;

    // The continuous audit reports it...
    let event = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(m) = events.next().await {
            let e: protocol::wire::FaultEvent = serde_json::from_slice(&m.payload)?;
            if e.process == p.as_str() && e.seq == forged_seq {
                return Ok::<_, anyhow::Error>(e);
            }
        }
        anyhow::bail!("the event subscription ended")
    })
    .await
    .context("no fault event for the forged run")??;
    assert_eq!(event.code, "unauthorized_key_change", "{event:?}");
    // ... a replica that loads the head afresh (the forged run is the subject's last
    // message, sealed by a trusted key, in its place and linked) does not take it
    // as the head, and the process goes on at the next slot (it gave none) ...
    s.stop().await?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(63), test_key(64)]).await?;
    wait_for_schedulers(&nats, 1).await?;
    assert_eq!(schedule_n(&client, &p, "after", 2).await?, vec![3, 4]);
    // ... and verify names it, with its stream sequence, from the log alone.
    let out = turnstile(&url, &["verify", p.as_str(), "--json"]).await?;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).context(show(&out))?;
    assert_eq!(
        faults(&doc),
        vec![(forged_seq, "unauthorized_key_change".to_string())],
        "{doc:#}"
    );
    let text = turnstile(&url, &["verify", p.as_str()]).await?;
    assert!(
        String::from_utf8_lossy(&text.stdout).contains(&format!(
            "stream sequence {forged_seq} (next slot 3): unauthorized_key_change"
        )),
        "{}",
        show(&text)
    );
    s.stop().await?;
    Ok(())
}
