//! Slots under replicas, crashes and restarts; idempotency; modes.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use journal::client::{Client, Schedule};
use journal::subjects::Subjects;
use protocol::wire::{ErrorCode, Mode, ProcessConfig};
use protocol::ProcessId;
use scheduler::Config;

use crate::support::*;

fn ids(clients: usize, per: usize) -> HashSet<String> {
    (0..clients)
        .flat_map(|c| (0..per).map(move |m| format!("c{c}-m{m}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_give_every_slot_exactly_once_and_the_chain_verifies() -> anyhow::Result<()>
{
    let server = server()?;
    let url = server.url();
    let key = test_key(1);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(InProcess::start(&server, Config::default(), vec![test_key(1)]).await?);
    }
    wait_for_schedulers(&connect(url).await?, 3).await?;
    let p = ProcessId::new("race")?;
    let (clients, per) = (6, 150);
    let receipts = load(url, &p, clients, per, 32).await?;

    // Every receipt stands on its own, and no two share a slot.
    let mut slots: Vec<u64> = receipts.iter().map(|r| r.slot).collect();
    slots.sort_unstable();
    assert_eq!(slots, (0..(clients * per) as u64).collect::<Vec<_>>());
    for r in &receipts {
        assert_eq!(
            r.check(None).map_err(anyhow::Error::msg)?,
            vec![key.id().to_string()]
        );
        assert!(r.durable);
    }
    let entries = read_log(url, &p).await?;
    assert_exactly_once(&entries, &ids(clients, per));
    let report = verify(url, &p, &[&key]).await?;
    assert_eq!(
        (report.faults.first().cloned(), report.checked),
        (None, (clients * per) as u64)
    );
    for r in replicas {
        r.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_loses_no_slot_and_repeats_none() -> anyhow::Result<()> {
    let server = server()?;
    let url = server.url().to_string();
    let dir = tempfile::tempdir()?;
    let key = test_key(2);
    let path = key_file(dir.path(), &key)?;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(spawn_scheduler(&server, &path, &[])?);
    }
    wait_for_schedulers(&connect(&url).await?, 3).await?;
    let p = ProcessId::new("crash")?;
    let (clients, per) = (6, 200);
    let load = tokio::spawn({
        let url = url.clone();
        let p = p.clone();
        async move { load(&url, &p, clients, per, 16).await }
    });
    // Kill one replica with SIGKILL once the load is well under way.
    let watcher = Client::new(connect(&url).await?, Subjects::default());
    loop {
        let info = watcher.slot(&p).await?;
        if info.next_slot >= 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    replicas[0].kill();
    let receipts = load.await??;
    assert_eq!(receipts.len(), clients * per);
    let entries = read_log(&url, &p).await?;
    assert_exactly_once(&entries, &ids(clients, per));
    // Each receipt names the slot where its message really is.
    for r in &receipts {
        assert_eq!(entries[r.slot as usize].message_id, r.message_id);
    }
    let report = verify(&url, &p, &[&key]).await?;
    assert_eq!(
        (report.faults.first().cloned(), report.checked),
        (None, (clients * per) as u64)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_continues_at_the_next_slot_with_an_unbroken_chain() -> anyhow::Result<()> {
    let mut server = server()?;
    let key = test_key(3);
    let p = ProcessId::new("restart")?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(3)]).await?;
    let client = Client::new(connect(server.url()).await?, Subjects::default());
    wait_for_schedulers(&connect(server.url()).await?, 1).await?;
    for i in 0..5 {
        let r = client
            .schedule(&p, Bytes::from(format!("before {i}")), &Schedule::default())
            .await?;
        assert_eq!(r.slot, i);
    }
    let before = client.slot(&p).await?;
    s.stop().await?;
    server.restart()?;

    let s = InProcess::start(&server, Config::default(), vec![test_key(3)]).await?;
    let client = Client::new(connect(server.url()).await?, Subjects::default());
    wait_for_schedulers(&connect(server.url()).await?, 1).await?;
    let after = client.slot(&p).await?;
    assert_eq!(
        (after.slot, after.chain_head),
        (before.slot, before.chain_head),
        "head read back from the log"
    );
    let r = client
        .schedule(&p, Bytes::from("after"), &Schedule::default())
        .await?;
    assert_eq!(r.slot, 5);
    assert_eq!(
        r.prev_hash, before.chain_head,
        "the new slot links to the old head"
    );
    let report = verify(server.url(), &p, &[&key]).await?;
    assert_eq!((report.faults.first().cloned(), report.checked), (None, 6));
    s.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_message_id_returns_the_original_assignment_on_any_replica_and_after_restart(
) -> anyhow::Result<()> {
    let server = server()?;
    let url = server.url();
    let a = InProcess::start(&server, Config::default(), vec![test_key(4)]).await?;
    let b = InProcess::start(&server, Config::default(), vec![test_key(4)]).await?;
    wait_for_schedulers(&connect(url).await?, 2).await?;
    let client = Client::new(connect(url).await?, Subjects::default());
    let p = ProcessId::new("dedupe")?;
    let with_id = |id: &str| Schedule {
        message_id: Some(id.into()),
        ..Default::default()
    };
    let first = client
        .schedule(&p, Bytes::from("one"), &with_id("order-1"))
        .await?;
    client
        .schedule(&p, Bytes::from("two"), &Schedule::default())
        .await?;
    // Many retries land on both replicas (queue group): all return slot 0's assignment.
    for _ in 0..20 {
        let again = client
            .schedule(&p, Bytes::from("one, retried"), &with_id("order-1"))
            .await?;
        assert!(again.duplicate);
        assert_eq!(
            (again.slot, again.chain_hash, again.timestamp_ms),
            (first.slot, first.chain_hash, first.timestamp_ms)
        );
        assert!(
            again.check(Some(b"one")).is_ok(),
            "the original body, not the retry's"
        );
    }
    // The same id twice in one burst gives one slot.
    let order2 = with_id("order-2");
    let burst = futures::future::join_all(
        (0..10).map(|_| client.schedule(&p, Bytes::from("burst"), &order2)),
    )
    .await;
    let slots: HashSet<u64> = burst
        .into_iter()
        .map(|r| r.map(|r| r.slot))
        .collect::<Result<_, _>>()?;
    assert_eq!(slots.len(), 1);
    // A fresh scheduler (after both stop) reloads the window from the log.
    a.stop().await?;
    b.stop().await?;
    let c = InProcess::start(&server, Config::default(), vec![test_key(4)]).await?;
    wait_for_schedulers(&connect(url).await?, 1).await?;
    let again = client
        .schedule(&p, Bytes::from("one"), &with_id("order-1"))
        .await?;
    assert_eq!((again.slot, again.duplicate), (0, true));
    assert_eq!(read_log(url, &p).await?.len(), 3);
    c.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_process_is_refused_and_nothing_is_written() -> anyhow::Result<()> {
    let server = server()?;
    let url = server.url();
    // Settings and streams are the operator's to change.
    let js = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    let store =
        journal::setup::ensure_processes(&js, &Subjects::default(), &Default::default()).await?;
    let off = ProcessConfig {
        mode: Some(Mode::Disabled),
        keys: vec![],
    };
    store.put("closed", off.encode()?.into()).await?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(5)]).await?;
    wait_for_schedulers(&connect(url).await?, 1).await?;
    let client = Client::new(connect(url).await?, Subjects::default());
    let closed = ProcessId::new("closed")?;
    let open = ProcessId::new("open")?;
    assert_refused(
        client
            .schedule(&closed, Bytes::from("x"), &Schedule::default())
            .await,
        ErrorCode::Disabled,
    );
    // Asking for `disabled` per request is refused too.
    assert_refused(
        client
            .schedule(&open, Bytes::from("x"), &with_mode(Mode::Disabled))
            .await,
        ErrorCode::Disabled,
    );
    // Disabling a live process takes effect through the settings watch.
    client
        .schedule(&open, Bytes::from("x"), &Schedule::default())
        .await?;
    store.put("open", off.encode()?.into()).await?;
    let mut refused = false;
    for _ in 0..100 {
        match client
            .schedule(&open, Bytes::from("y"), &Schedule::default())
            .await
        {
            Err(journal::Error::Refused {
                code: ErrorCode::Disabled,
                ..
            }) => {
                refused = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => return Err(e.into()),
        }
    }
    assert!(refused, "disabling did not take effect within 2 s");
    assert!(read_log(url, &closed).await?.is_empty());
    s.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_aggressive_and_remote_confirmation_answer_as_documented() -> anyhow::Result<()> {
    let server = server()?;
    let url = server.url();
    // Settings and streams are the operator's to change.
    let js = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    // The "remote" stream: a mirror of the log (in production: another cluster or domain).
    journal::setup::ensure_log(&js, &Subjects::default(), &Default::default()).await?;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TS_LOG_MIRROR".into(),
        mirror: Some(async_nats::jetstream::stream::Source {
            name: "TS_LOG".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    let config = Config {
        remote_stream: Some("TS_LOG_MIRROR".into()),
        ..Config::default()
    };
    let s = InProcess::start(&server, config, vec![test_key(6)]).await?;
    wait_for_schedulers(&connect(url).await?, 1).await?;
    let client = Client::new(connect(url).await?, Subjects::default());
    let p = ProcessId::new("modes")?;
    let fast = client
        .schedule(&p, Bytes::from("a"), &with_mode(Mode::Aggressive))
        .await?;
    assert!(
        !fast.durable,
        "aggressive replies before the write is acknowledged"
    );
    assert!(fast.check(Some(b"a")).is_ok());
    let remote = client
        .schedule(&p, Bytes::from("b"), &with_mode(Mode::RemoteConfirmation))
        .await?;
    assert!(remote.durable);
    assert_eq!(remote.slot, 1);
    let mirror = js.get_stream("TS_LOG_MIRROR").await?;
    let last = mirror
        .get_last_raw_message_by_subject("ts.log.modes")
        .await?;
    assert_eq!(
        protocol::wire::Run::decode(&last.payload)?.last_slot(),
        1,
        "remote confirmation means the mirror has it"
    );
    s.stop().await?;

    // Without a remote stream the mode is refused with its own code.
    let s = InProcess::start(&server, Config::default(), vec![test_key(6)]).await?;
    wait_for_schedulers(&connect(url).await?, 1).await?;
    assert_refused(
        client
            .schedule(&p, Bytes::from("c"), &with_mode(Mode::RemoteConfirmation))
            .await,
        ErrorCode::RemoteNotConfigured,
    );
    assert_eq!(read_log(url, &p).await?.len(), 2);
    s.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_requiring_two_keys_gets_both_commitments_and_a_missing_key_is_refused(
) -> anyhow::Result<()> {
    let server = server()?;
    let url = server.url();
    let (k1, k2, k3) = (test_key(7), test_key(8), test_key(9));
    // Settings and streams are the operator's to change.
    let js = async_nats::jetstream::new(connect_as(&server, Role::Operator).await?);
    let store =
        journal::setup::ensure_processes(&js, &Subjects::default(), &Default::default()).await?;
    store
        .put(
            "multi",
            ProcessConfig {
                mode: None,
                keys: vec![k1.id().into(), k2.id().into()],
            }
            .encode()?
            .into(),
        )
        .await?;
    store
        .put(
            "foreign",
            ProcessConfig {
                mode: None,
                keys: vec![k3.id().into()],
            }
            .encode()?
            .into(),
        )
        .await?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(7), test_key(8)]).await?;
    wait_for_schedulers(&connect(url).await?, 1).await?;
    let client = Client::new(connect(url).await?, Subjects::default());
    let r = client
        .schedule(
            &ProcessId::new("multi")?,
            Bytes::from("m"),
            &Schedule::default(),
        )
        .await?;
    let mut signers = r.check(None).map_err(anyhow::Error::msg)?;
    signers.sort();
    let mut want = vec![k1.id().to_string(), k2.id().to_string()];
    want.sort();
    assert_eq!(signers, want);
    assert_refused(
        client
            .schedule(
                &ProcessId::new("foreign")?,
                Bytes::from("m"),
                &Schedule::default(),
            )
            .await,
        ErrorCode::MissingKey,
    );
    // Both published keys are fetchable by verifiers.
    let keys_store = journal::setup::open_bucket(&js, "TS_KEYS").await?;
    let published: HashSet<String> = journal::keyring::fetch(&keys_store)
        .await?
        .into_iter()
        .map(|k| k.key_id)
        .collect();
    assert!(published.contains(k1.id()) && published.contains(k2.id()));
    s.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_at_once_through_three_replicas_each_get_exact_slots() -> anyhow::Result<()>
{
    // Many processes writing at once go through the atomic-batch writer; three replicas
    // racing on the same processes make whole batches fail and fall back to single writes.
    let server = server()?;
    let url = server.url();
    let key = test_key(14);
    let mut replicas = Vec::new();
    // Two single slots each: the backlog of 40 busy processes goes as atomic batches
    // (with the default 256 slots, 40 processes would all be written as singles).
    let config = Config {
        singles_in_flight: 2,
        ..Config::default()
    };
    for _ in 0..3 {
        replicas.push(InProcess::start(&server, config.clone(), vec![test_key(14)]).await?);
    }
    wait_for_schedulers(&connect(url).await?, 3).await?;
    let processes: Vec<ProcessId> = (0..40)
        .map(|i| ProcessId::new(format!("many-{i}")))
        .collect::<Result<_, _>>()?;
    let per = 25;
    let nats = connect(url).await?;
    let client = std::sync::Arc::new(
        Client::new(nats, Subjects::default()).with_timeout(Duration::from_secs(5)),
    );
    let jobs = processes
        .iter()
        .flat_map(|p| (0..per).map(move |m| (p.clone(), m)));
    let results: Vec<anyhow::Result<protocol::wire::Receipt>> = futures::stream::iter(jobs)
        .map(|(p, m)| {
            let client = std::sync::Arc::clone(&client);
            async move {
                let opts = Schedule {
                    message_id: Some(format!("c0-m{m}")),
                    ..Default::default()
                };
                schedule_retrying(&client, &p, Bytes::from(format!("{p} {m}")), &opts).await
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    for r in results {
        r?;
    }
    for p in &processes {
        let entries = read_log(url, p).await?;
        assert_exactly_once(&entries, &ids(1, per));
        let report = verify(url, p, &[&key]).await?;
        assert_eq!(
            (report.faults.first().cloned(), report.checked),
            (None, per as u64),
            "{p}"
        );
    }
    // The counters of all three replicas: the batch path was taken, and what they
    // stored adds up to exactly what the log holds.
    let totals = scheduler_counters(url, 3).await?;
    eprintln!("scheduler counters: {totals:?}");
    assert!(
        totals["batches_committed"] > 0,
        "no atomic batch was committed: {totals:?}"
    );
    assert_eq!(totals["assignments_stored"], (processes.len() * per) as u64);
    for r in replicas {
        r.stop().await?;
    }
    Ok(())
}
