//! Verification against tampering, range pages, log reads.

use bytes::Bytes;

use journal::client::{Client, Schedule};
use journal::subjects::Subjects;
use protocol::verify::FaultKind;
use protocol::wire::RangeRequest;
use protocol::ProcessId;
use scheduler::Config;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_altered_on_disk_makes_verify_name_its_slot() -> anyhow::Result<()> {
    let mut server = server()?;
    let key = test_key(12);
    let dir = tempfile::tempdir()?;
    let key_path = key_file(dir.path(), &key)?;
    let p = ProcessId::new("tamper")?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(12)]).await?;
    wait_for_schedulers(&connect(server.url()).await?, 1).await?;
    let client = Client::new(connect(server.url()).await?, Subjects::default());
    for i in 0..10 {
        client
            .schedule(
                &p,
                Bytes::from(format!("payload-{i:02}")),
                &Schedule::default(),
            )
            .await?;
    }
    assert_eq!(verify(server.url(), &p, &[&key]).await?.faults, vec![]);
    s.stop().await?;

    // Behind the scheduler's back: stop the server and edit slot 6's body in its files.
    server.stop();
    let changed = patch_files(&server.store_dir(), b"payload-06", b"PAYLOAD-06")?;
    assert!(changed >= 1, "slot 6's body not found in the store");
    server.restart()?;

    let report = verify(server.url(), &p, &[&key]).await?;
    let fault = report.faults.first().expect("tampering must be detected");
    eprintln!("tamper detected as: {fault}");
    assert_eq!(fault.slot, 6, "{fault}");
    // Either the altered body fails its chain hash (a foreign message), or the server
    // dropped the damaged record and the log lost it: both name slot 6.
    assert!(
        matches!(
            fault.kind,
            FaultKind::BadChainHash(6) | FaultKind::Lost { .. } | FaultKind::Gap { .. }
        ),
        "{fault}"
    );
    assert_eq!(
        report.last_good,
        Some(9),
        "the chain goes on after the damage"
    );

    // The CLI says the same, with exit code 1.
    let out = std::process::Command::new(harness::workspace_bin("turnstile")?)
        .args(["verify", "tamper", "--trust"])
        .arg(&key_path)
        .env("NATS_URL", server.url())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("slot 6"), "{stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_pages_carry_an_explicit_cursor_and_slot_lookups_find_every_run() -> anyhow::Result<()>
{
    let server = server()?;
    let url = server.url();
    let s = InProcess::start(&server, Config::default(), vec![test_key(13)]).await?;
    wait_for_schedulers(&connect(url).await?, 1).await?;
    let client = Client::new(connect(url).await?, Subjects::default());
    let p = ProcessId::new("pages")?;
    // Runs of different sizes: a burst (batched) between single writes.
    for i in 0..5 {
        client
            .schedule(&p, Bytes::from(format!("single {i}")), &Schedule::default())
            .await?;
    }
    let plain = Schedule::default();
    let burst = futures::future::join_all(
        (0..30).map(|i| client.schedule(&p, Bytes::from(format!("burst {i}")), &plain)),
    )
    .await;
    assert!(burst.iter().all(Result::is_ok));
    for i in 0..5 {
        client
            .schedule(&p, Bytes::from(format!("tail {i}")), &Schedule::default())
            .await?;
    }
    // Walk the whole log in pages of 7: every slot once, in order, cursor to the end.
    let mut from = 0;
    let mut seen = Vec::new();
    loop {
        let page = client
            .range(
                &p,
                &RangeRequest {
                    from,
                    to: None,
                    limit: Some(7),
                },
            )
            .await?;
        assert!(page.entries.len() <= 7);
        seen.extend(page.entries.iter().map(|e| e.slot));
        match page.next {
            Some(n) => {
                assert_eq!(n, seen.last().map(|s| s + 1).unwrap_or(from));
                from = n;
            }
            None => break,
        }
    }
    assert_eq!(seen, (0..40).collect::<Vec<_>>());
    // A bounded range starting mid-run.
    let page = client
        .range(
            &p,
            &RangeRequest {
                from: 13,
                to: Some(17),
                limit: None,
            },
        )
        .await?;
    assert_eq!(
        (
            page.entries.iter().map(|e| e.slot).collect::<Vec<_>>(),
            page.next
        ),
        ((13..=17).collect(), None)
    );
    // Beyond the head: empty and final.
    let page = client
        .range(
            &p,
            &RangeRequest {
                from: 40,
                to: None,
                limit: None,
            },
        )
        .await?;
    assert!(page.entries.is_empty() && page.next.is_none());
    // The reader finds the run of every slot (binary search over the stream).
    let js = async_nats::jetstream::new(connect(url).await?);
    let reader = journal::reader::LogReader::open(js, Subjects::default()).await?;
    for slot in 0..40 {
        let seq = reader.locate(&p, slot).await?.expect("slot exists");
        let run = reader
            .message_at(&p, seq)
            .await?
            .expect("located message exists")
            .decode()
            .map_err(anyhow::Error::msg)?;
        assert!(
            run.first_slot <= slot && slot <= run.last_slot(),
            "slot {slot} not in run {}..{}",
            run.first_slot,
            run.last_slot()
        );
    }
    assert_eq!(reader.locate(&p, 40).await?, None);
    s.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_the_log_yields_new_runs_as_they_are_written() -> anyhow::Result<()> {
    use futures::StreamExt;
    let server = server()?;
    let url = server.url();
    let s = InProcess::start(&server, Config::default(), vec![test_key(16)]).await?;
    wait_for_schedulers(&connect(url).await?, 1).await?;
    let client = Client::new(connect(url).await?, Subjects::default());
    let p = ProcessId::new("tail")?;
    for i in 0..3 {
        client
            .schedule(&p, Bytes::from(format!("old {i}")), &Schedule::default())
            .await?;
    }
    let js = async_nats::jetstream::new(connect(url).await?);
    let trusted = crate::support::published_keys(&js).await?;
    let reader = journal::reader::LogReader::open(js, Subjects::default()).await?;
    // Follow from slot 2: the old slot 2 first, then what is written afterwards.
    let mut runs = journal::chain::from_slot(&reader, &p, &trusted, 2, true).await?;
    let writer = tokio::spawn({
        let client = client.clone();
        let p = p.clone();
        async move {
            for i in 0..3 {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                client
                    .schedule(&p, Bytes::from(format!("new {i}")), &Schedule::default())
                    .await?;
            }
            Ok::<_, journal::Error>(())
        }
    });
    let mut slots = Vec::new();
    while slots.len() < 4 {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), runs.next()).await?;
        let journal::chain::Judged::Chain { run: stored, .. } =
            next.expect("a following stream does not end")?
        else {
            panic!("an honest log has no foreign message");
        };
        slots.extend(
            stored
                .run
                .entries
                .iter()
                .map(|e| e.slot)
                .filter(|s| *s >= 2),
        );
    }
    assert_eq!(slots, vec![2, 3, 4, 5]);
    writer.await??;
    s.stop().await?;
    Ok(())
}
