//! The scheduler keeps its word (issue 8): each test injects the case a defect was
//! found with and checks the promise.

use anyhow::Result;
use async_nats::HeaderMap;
use bytes::Bytes;

use journal::client::Client;
use journal::subjects::Subjects;
use protocol::wire::{ErrorCode, Receipt};
use protocol::ProcessId;
use scheduler::Config;

use crate::support::*;

async fn raw_schedule(
    client: &Client,
    process: &str,
    headers: &[(&str, &str)],
) -> Result<Receipt, journal::Error> {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(*k, *v);
    }
    let reply = client
        .request(format!("ts.schedule.{process}"), h, Bytes::from("body"))
        .await?;
    Ok(Receipt::decode(&reply.payload)?)
}

/// Header names are honoured whatever their case, and a reserved name we do not know
/// is refused: none is ever dropped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_headers_count_whatever_their_case() -> Result<()> {
    let server = server()?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(41)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats, Subjects::default());

    let first = raw_schedule(&client, "cases", &[("nats-msg-id", "order-1")]).await?;
    let again = raw_schedule(&client, "cases", &[("NATS-MSG-ID", "order-1")]).await?;
    assert_eq!((again.slot, again.duplicate), (first.slot, true));
    assert_eq!(first.message_id, "order-1");

    assert_refused(
        raw_schedule(&client, "cases", &[("ts-mode", "disabled")]).await,
        ErrorCode::Disabled,
    );
    assert_refused(
        raw_schedule(&client, "cases", &[("TS-MODE", "Disabled")]).await,
        ErrorCode::Disabled,
    );
    assert_refused(
        raw_schedule(&client, "cases", &[("Ts-Mdoe", "aggressive")]).await,
        ErrorCode::Malformed,
    );
    assert_refused(
        raw_schedule(
            &client,
            "cases",
            &[("Nats-Msg-Id", "a"), ("nats-msg-id", "b")],
        )
        .await,
        ErrorCode::Malformed,
    );
    // Nothing refused was written: the process holds the one message.
    let log = read_log(server.url(), &ProcessId::new("cases")?).await?;
    assert_eq!(log.len(), 1);
    s.stop().await?;
    Ok(())
}

/// A page of `ts.range` is bounded by everything its entries carry, headers included:
/// entries with large headers come in several pages, each under the server's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_pages_count_headers_too() -> Result<()> {
    let server = server()?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(42)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats.clone(), Subjects::default());
    let p = ProcessId::new("fat")?;
    let big = "h".repeat(60_000);
    for i in 0..40 {
        let opts = journal::client::Schedule {
            headers: vec![("x-big".into(), big.clone())],
            ..Default::default()
        };
        client
            .schedule(&p, Bytes::from(format!("m{i}")), &opts)
            .await?;
    }
    let max_payload = nats.server_info().max_payload;
    let mut from = 0;
    let mut pages = 0;
    let mut slots = Vec::new();
    loop {
        let req = protocol::wire::RangeRequest {
            from,
            to: None,
            limit: None,
        };
        let reply = client
            .request(
                format!("ts.range.{p}"),
                HeaderMap::new(),
                req.encode()?.into(),
            )
            .await?;
        assert!(
            reply.payload.len() <= max_payload,
            "page of {} bytes",
            reply.payload.len()
        );
        let page = protocol::wire::RangePage::decode(&reply.payload)?;
        pages += 1;
        slots.extend(page.entries.iter().map(|e| e.slot));
        match page.next {
            Some(n) => from = n,
            None => break,
        }
    }
    assert_eq!(slots, (0..40).collect::<Vec<_>>());
    assert!(pages > 1, "2.4 MB of headers cannot come in one page");
    s.stop().await?;
    Ok(())
}

/// A scheduler configuration whose `remote_confirmation` waits for a stream that never
/// receives the log (created here).
async fn remote_that_never_confirms(server: &harness::NatsServer) -> Result<Config> {
    let js = async_nats::jetstream::new(connect_as(server, harness::Role::Operator).await?);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "NOWHERE".into(),
        subjects: vec!["nowhere.>".into()],
        ..Default::default()
    })
    .await?;
    Ok(Config {
        remote_stream: Some("NOWHERE".into()),
        ..Config::default()
    })
}

/// A duplicate asked for with `remote_confirmation` is answered as the mode promises:
/// once the remote has it, or `remote_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_confirmation_duplicate_waits_for_the_remote() -> Result<()> {
    let server = server()?;
    let config = Config {
        remote_timeout: std::time::Duration::from_millis(300),
        ..remote_that_never_confirms(&server).await?
    };
    let s = InProcess::start(&server, config, vec![test_key(43)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats, Subjects::default());
    let first = raw_schedule(&client, "dup", &[("Nats-Msg-Id", "r-1")]).await?;
    assert_eq!(first.slot, 0);
    assert_refused(
        raw_schedule(
            &client,
            "dup",
            &[("Nats-Msg-Id", "r-1"), ("Ts-Mode", "remote_confirmation")],
        )
        .await,
        ErrorCode::RemoteTimeout,
    );
    s.stop().await?;
    Ok(())
}

/// A burst of requests with long ids to one process is written, not refused: the
/// `Ts-Ids` header of each run stays under NATS's 64 KiB header limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_with_long_ids_is_all_written() -> Result<()> {
    let server = server()?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(44)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats, Subjects::default());
    let p = ProcessId::new("burst")?;
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let client = client.clone();
            let p = p.clone();
            tokio::spawn(async move {
                let opts = journal::client::Schedule {
                    message_id: Some(format!("{i:04}-{}", "x".repeat(251))),
                    ..Default::default()
                };
                client
                    .schedule(&p, Bytes::from(format!("b{i}")), &opts)
                    .await
            })
        })
        .collect();
    let mut slots = Vec::new();
    for t in tasks {
        let r = t.await??;
        assert_eq!(r.message_id.len(), 256);
        slots.push(r.slot);
    }
    slots.sort_unstable();
    assert_eq!(slots, (0..1000).collect::<Vec<_>>());
    eprintln!("1000 requests with 256-byte ids: {:?}", started.elapsed());
    s.stop().await?;
    Ok(())
}

/// The largest request the scheduler accepts is written; one byte more is refused at
/// once with `too_large` naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_request_is_written_and_one_byte_more_is_refused_at_once() -> Result<()> {
    let server = server()?;
    let config = Config {
        max_body: 64 * 1024 * 1024,
        max_run_bytes: 64 * 1024 * 1024,
        ..Config::default()
    };
    let s = InProcess::start(&server, config, vec![test_key(45)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let info: serde_json::Value = serde_json::from_slice(
        &nats
            .request("$SRV.INFO.turnstile-scheduler", Bytes::new())
            .await?
            .payload,
    )?;
    let limit: usize = info["metadata"]["max_request_bytes"]
        .as_str()
        .expect("max_request_bytes in INFO")
        .parse()?;
    let client =
        Client::new(nats, Subjects::default()).with_timeout(std::time::Duration::from_secs(30));
    let p = ProcessId::new("largest")?;
    let id = "largest-1";
    let opts = journal::client::Schedule {
        message_id: Some(id.into()),
        ..Default::default()
    };
    let r = client
        .schedule(&p, Bytes::from(vec![7u8; limit - id.len()]), &opts)
        .await?;
    assert_eq!(r.slot, 0);
    let started = std::time::Instant::now();
    let opts = journal::client::Schedule {
        message_id: Some("largest-2".into()),
        ..Default::default()
    };
    let refused = client
        .schedule(&p, Bytes::from(vec![7u8; limit - id.len() + 1]), &opts)
        .await;
    assert_refused(refused, ErrorCode::TooLarge);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "refused at intake"
    );
    assert_eq!(read_log(server.url(), &p).await?.len(), 1);
    s.stop().await?;
    Ok(())
}

/// A full log is a permanent error until someone makes room: refused at once with
/// `log_full` (never retried for the write deadline), a fault event, and the
/// scheduler resumes by itself once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_is_refused_at_once_and_resumes_when_there_is_room() -> Result<()> {
    use futures::StreamExt;
    let server = server()?;
    let js = async_nats::jetstream::new(connect_as(&server, harness::Role::Operator).await?);
    let subjects = Subjects::default();
    let mut log = journal::setup::log_stream_config(&subjects, &Default::default());
    log.max_bytes = 64 * 1024;
    js.create_stream(log.clone()).await?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(46)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let mut events = nats.subscribe("ts.events.fault").await?;
    nats.flush().await?;
    let client = Client::new(nats, subjects);
    let p = ProcessId::new("full")?;
    let mut written = 0u64;
    let started = std::time::Instant::now();
    let refused = loop {
        match client
            .schedule(&p, Bytes::from(vec![1u8; 4096]), &Default::default())
            .await
        {
            Ok(r) => {
                assert_eq!(r.slot, written);
                written += 1;
            }
            Err(e) => break e,
        }
        assert!(written < 100, "64 KiB cannot hold 100 messages of 4 KiB");
    };
    assert!(
        matches!(
            &refused,
            journal::Error::Refused {
                code: ErrorCode::LogFull,
                ..
            }
        ),
        "{refused}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "not retried for 30 s"
    );
    let event = tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
        .await?
        .expect("a fault event");
    let event: protocol::wire::FaultEvent = serde_json::from_slice(&event.payload)?;
    assert_eq!(event.code, "log_full");
    // The operator makes room; the next request goes through, at the next slot.
    log.max_bytes = 16 * 1024 * 1024;
    js.update_stream(log).await?;
    let r = client
        .schedule(&p, Bytes::from("after"), &Default::default())
        .await?;
    assert_eq!(r.slot, written);
    s.stop().await?;
    Ok(())
}

/// A write whose acknowledgement never came (the server stalled past the publish
/// timeout) is resolved from the log before anything else is planned: requests
/// without ids are never written twice, and every receipt matches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stall_writes_no_request_twice() -> Result<()> {
    use std::collections::HashMap;
    let server = server()?;
    let pid = server.pid().expect("running") as i32;
    let s = InProcess::start(&server, Config::default(), vec![test_key(47)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client =
        Client::new(nats, Subjects::default()).with_timeout(std::time::Duration::from_secs(60));
    let p = ProcessId::new("stall")?;
    let stop_at = std::time::Instant::now() + std::time::Duration::from_secs(14);
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let client = client.clone();
            let p = p.clone();
            tokio::spawn(async move {
                let mut receipts = Vec::new();
                let mut i = 0;
                while std::time::Instant::now() < stop_at {
                    let body = format!("t{t}-{i}");
                    i += 1;
                    if let Ok(r) = client
                        .schedule(&p, Bytes::from(body.clone()), &Default::default())
                        .await
                    {
                        receipts.push((body, r));
                    }
                }
                receipts
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
    };
    signal("-STOP")?;
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    signal("-CONT")?;
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.extend(t.await?);
    }
    let log = read_log(server.url(), &p).await?;
    let slots: Vec<u64> = log.iter().map(|e| e.slot).collect();
    assert_eq!(slots, (0..log.len() as u64).collect::<Vec<_>>(), "no gap");
    let mut bodies: HashMap<Vec<u8>, u64> = HashMap::new();
    for e in &log {
        if let Some(first) = bodies.insert(e.body.clone(), e.slot) {
            panic!(
                "{} written at slots {first} and {}",
                String::from_utf8_lossy(&e.body),
                e.slot
            );
        }
    }
    for (body, r) in &receipts {
        assert_eq!(
            bodies.get(body.as_bytes()),
            Some(&r.slot),
            "receipt of {body} matches the log"
        );
    }
    eprintln!(
        "{} assignments, {} receipts through an 8 s stall",
        log.len(),
        receipts.len()
    );
    s.stop().await?;
    Ok(())
}

/// A clock an hour ahead on one replica must not hang the process for the others: a
/// load never waits for a message that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_clock_does_not_hang_a_process_after_a_restart() -> Result<()> {
    struct Ahead;
    impl scheduler::Clock for Ahead {
        fn now_ms(&self) -> u64 {
            scheduler::SystemClock.now_ms() + 3_600_000
        }
    }
    use scheduler::Clock as _;
    let server = server()?;
    let start = |clock: std::sync::Arc<dyn scheduler::Clock>| {
        let server = &server;
        async move {
            let connections = scheduler::Connections {
                core: connect_as(server, harness::Role::Scheduler).await?,
                intake: connect_as(server, harness::Role::SchedulerIntake).await?,
            };
            let config = Config {
                dedupe_window: std::time::Duration::from_secs(1),
                ..Config::default()
            };
            let shutdown = tokio_util::sync::CancellationToken::new();
            let keyring = scheduler::Keyring::new(vec![test_key(48)])?;
            let handle = tokio::spawn(scheduler::run_with_clock(
                config,
                keyring,
                connections,
                shutdown.clone(),
                clock,
            ));
            anyhow::Ok((shutdown, handle))
        }
    };
    let nats = connect(server.url()).await?;
    let client = Client::new(nats.clone(), Subjects::default())
        .with_timeout(std::time::Duration::from_secs(20));
    let p = ProcessId::new("skew")?;
    let (stop, handle) = start(std::sync::Arc::new(Ahead)).await?;
    wait_for_schedulers(&nats, 1).await?;
    let opts = journal::client::Schedule {
        message_id: Some("s-1".into()),
        ..Default::default()
    };
    client
        .schedule(&p, Bytes::from("from the future"), &opts)
        .await?;
    stop.cancel();
    handle.await??;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    let (stop, handle) = start(std::sync::Arc::new(scheduler::SystemClock)).await?;
    wait_for_schedulers(&nats, 1).await?;
    let started = std::time::Instant::now();
    let r = client
        .schedule(&p, Bytes::from("now"), &Default::default())
        .await?;
    assert_eq!(r.slot, 1);
    assert!(
        r.timestamp_ms >= scheduler::SystemClock.now_ms() + 3_000_000,
        "timestamps never go back, even behind a skewed writer"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    stop.cancel();
    handle.await??;
    Ok(())
}

async fn one_each(client: &Client, processes: usize, tag: &'static str) -> Result<Vec<u64>> {
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut slots = Vec::new();
                for i in (t..processes).step_by(64) {
                    let p = ProcessId::new(format!("many-{i}"))?;
                    let opts = journal::client::Schedule {
                        message_id: Some(format!("{tag}-{i}")),
                        ..Default::default()
                    };
                    slots.push(client.schedule(&p, Bytes::from(tag), &opts).await?.slot);
                }
                anyhow::Ok(slots)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// A restart with thousands of active processes loads them all, no request failing,
/// and loading leaves no consumer behind on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_5000_active_processes_loads_them_all() -> Result<()> {
    let server = server()?;
    let n = 5000;
    let s = InProcess::start(&server, Config::default(), vec![test_key(49)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats.clone(), Subjects::default())
        .with_timeout(std::time::Duration::from_secs(60));
    assert!(one_each(&client, n, "first").await?.iter().all(|s| *s == 0));
    s.stop().await?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(49)]).await?;
    wait_for_schedulers(&nats, 1).await?;
    let started = std::time::Instant::now();
    assert!(one_each(&client, n, "second")
        .await?
        .iter()
        .all(|s| *s == 1));
    eprintln!(
        "{n} cold loads and writes after a restart: {:?}",
        started.elapsed()
    );
    let js = async_nats::jetstream::new(connect_as(&server, harness::Role::Operator).await?);
    let consumers = js
        .get_stream("TS_LOG")
        .await?
        .info()
        .await?
        .state
        .consumer_count;
    assert!(consumers <= 3, "{consumers} consumers left on the log");
    s.stop().await?;
    Ok(())
}

/// The same id sent at once to two replicas: one assignment, one `duplicate: false`,
/// and both receipts are the run the log holds (its slot, its seal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_at_two_replicas_gives_one_assignment_and_receipts_from_the_log() -> Result<()>
{
    use std::collections::HashMap;
    let server = server()?;
    let a = InProcess::start(&server, Config::default(), vec![test_key(51)]).await?;
    let b = InProcess::start(&server, Config::default(), vec![test_key(52)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 2).await?;
    let client = Client::new(nats, Subjects::default());
    let p = ProcessId::new("twins")?;
    let mut receipts = Vec::new();
    for i in 0..150 {
        let opts = journal::client::Schedule {
            message_id: Some(format!("twin-{i}")),
            ..Default::default()
        };
        let (x, y) = tokio::join!(
            client.schedule(&p, Bytes::from(format!("{i}")), &opts),
            client.schedule(&p, Bytes::from(format!("{i}")), &opts)
        );
        let (x, y) = (x?, y?);
        assert_eq!(x.slot, y.slot, "twin-{i}");
        assert!(x.duplicate || y.duplicate, "twin-{i}: both said new");
        receipts.push(x);
        receipts.push(y);
    }
    let log = read_log(server.url(), &p).await?;
    assert_eq!(log.len(), 150, "one assignment per id");
    // Every receipt is what the log holds: same chain hash at that slot, sealed by a
    // key that sealed that run.
    let js = async_nats::jetstream::new(connect_as(&server, harness::Role::Operator).await?);
    let reader = journal::reader::LogReader::open(js, Subjects::default()).await?;
    let mut signer_of: HashMap<u64, Vec<String>> = HashMap::new();
    let tail = reader.last_message(&p).await?.map(|m| m.seq).unwrap_or(0);
    let mut msgs = reader.messages(&p, 1, Some(tail)).await?;
    while let Some(m) = futures::StreamExt::next(&mut msgs).await {
        let run = m?.decode().map_err(anyhow::Error::msg)?;
        let keys: Vec<String> = run
            .seal
            .commitments
            .iter()
            .map(|c| c.key_id.clone())
            .collect();
        for e in &run.entries {
            signer_of.insert(e.slot, keys.clone());
        }
    }
    for r in &receipts {
        assert_eq!(r.chain_hash, log[r.slot as usize].chain_hash);
        let keys: Vec<String> = r
            .seal
            .commitments
            .iter()
            .map(|c| c.key_id.clone())
            .collect();
        assert_eq!(
            Some(&keys),
            signer_of.get(&r.slot),
            "slot {}: receipt sealed by a key not in the log",
            r.slot
        );
        assert!(r.check(None).is_ok());
    }
    a.stop().await?;
    b.stop().await?;
    Ok(())
}

/// `turnstile process set` returns once every live replica applies the change: a
/// request sent right after it is already refused by whichever replica takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_set_returns_once_every_replica_applies_it() -> Result<()> {
    let server = server()?;
    let a = InProcess::start(&server, Config::default(), vec![test_key(53)]).await?;
    let b = InProcess::start(&server, Config::default(), vec![test_key(53)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 2).await?;
    let client = Client::new(nats, Subjects::default());
    let p = ProcessId::new("switch")?;
    client
        .schedule(&p, Bytes::from("before"), &Default::default())
        .await?;
    let out = std::process::Command::new(harness::workspace_bin("turnstile")?)
        .args(["process", "set", "switch", "--mode", "disabled"])
        .env("NATS_URL", server.url_as(harness::Role::Operator))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("applied by 2 scheduler(s)"), "{stderr}");
    for i in 0..50 {
        assert_refused(
            client
                .schedule(&p, Bytes::from(format!("after {i}")), &Default::default())
                .await,
            ErrorCode::Disabled,
        );
    }
    assert_eq!(read_log(server.url(), &p).await?.len(), 1);
    a.stop().await?;
    b.stop().await?;
    Ok(())
}

/// Admission is bounded in bytes: while admitted requests are held (here: waiting for
/// a remote that never confirms), requests past the bound get `busy` at once with a
/// retry hint; every request is answered, none dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_in_bytes_is_answered_busy_at_once() -> Result<()> {
    let server = server()?;
    let config = Config {
        max_queued_bytes_per_process: 1024 * 1024,
        remote_timeout: std::time::Duration::from_secs(3),
        ..remote_that_never_confirms(&server).await?
    };
    let s = InProcess::start(&server, config, vec![test_key(54)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client =
        Client::new(nats, Subjects::default()).with_timeout(std::time::Duration::from_secs(60));
    let p = ProcessId::new("heavy")?;
    let held = with_mode(protocol::wire::Mode::RemoteConfirmation);
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let client = client.clone();
            let p = p.clone();
            let held = held.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let r = client
                    .schedule(&p, Bytes::from(vec![i as u8; 100_000]), &held)
                    .await;
                (r, started.elapsed())
            })
        })
        .collect();
    let (mut held_back, mut busy) = (0, 0);
    for t in tasks {
        match t.await? {
            (
                Err(journal::Error::Refused {
                    code: ErrorCode::RemoteTimeout,
                    ..
                }),
                _,
            ) => held_back += 1,
            (
                Err(journal::Error::Refused {
                    code: ErrorCode::Busy,
                    message,
                }),
                took,
            ) => {
                assert!(message.contains("retry in"), "{message}");
                assert!(
                    took < std::time::Duration::from_secs(2),
                    "busy is answered at once: {took:?}"
                );
                busy += 1;
            }
            (other, _) => panic!("{other:?}"),
        }
    }
    assert!(
        busy >= 20,
        "{busy} busy of 40 requests of 100 kB against a 1 MiB bound"
    );
    assert!(held_back >= 5, "{held_back} admitted");
    assert_eq!(read_log(server.url(), &p).await?.len(), held_back);
    // Once they are answered the bound is free again.
    let r = client
        .schedule(&p, Bytes::from(vec![0u8; 100_000]), &Default::default())
        .await?;
    assert_eq!(r.slot, held_back as u64);
    s.stop().await?;
    Ok(())
}
