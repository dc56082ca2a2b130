//! Bad input mixed into normal load, sent as raw protocol bytes: every valid request
//! is answered, every bad one gets its typed error where its reply subject is
//! usable, and no scheduler loses its NATS connection.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;

use journal::client::{Client, Schedule};
use journal::subjects::Subjects;
use protocol::ProcessId;
use scheduler::Config;

use crate::raw::{publish, RawClient};
use crate::support::*;

/// One bad request: subject, reply (none: `_INBOX.bad.<n>`), header block, body, and the
/// `Ts-Error` expected on the answer (none: no answer is possible).
struct Bad {
    subject: &'static [u8],
    reply: Option<&'static [u8]>,
    header: Option<&'static [u8]>,
    body: &'static [u8],
    expect: Option<&'static str>,
}

const fn bad(
    subject: &'static [u8],
    header: Option<&'static [u8]>,
    body: &'static [u8],
    expect: Option<&'static str>,
) -> Bad {
    Bad {
        subject,
        reply: None,
        header,
        body,
        expect,
    }
}

const BAD: &[Bad] = &[
    // What the client library cannot parse.
    bad(
        b"ts.schedule.p1",
        Some(b"NATS/1.0\r\nNats-Msg-Id: \xff\xfe\r\n\r\n"),
        b"x",
        Some("malformed_request"),
    ),
    bad(
        b"ts.schedule.p1",
        Some(b"NATS/1.0\r\nX: \xff\r\n\r\n"),
        b"x",
        Some("malformed_request"),
    ),
    bad(
        b"ts.schedule.p1",
        Some(b"NATS/1.0\r\nno colon here\r\n\r\n"),
        b"x",
        Some("malformed_request"),
    ),
    bad(
        b"ts.schedule.p1",
        Some(b"NATS/2.0\r\nX: y\r\n\r\n"),
        b"x",
        Some("malformed_request"),
    ),
    bad(
        b"ts.schedule.p1",
        Some(b"NATS/1.0\r\nA B: y\r\n\r\n"),
        b"x",
        Some("malformed_request"),
    ),
    bad(
        b"ts.schedule.p1",
        Some(b"NATS/1.0 abc\r\n\r\n"),
        b"x",
        Some("malformed_request"),
    ),
    bad(
        b"ts.schedule.p1",
        Some(b"NATS/1.0\r\nX: a\rb\r\n\r\n"),
        b"x",
        Some("malformed_request"),
    ),
    bad(
        b"ts.schedule.\xff\xfe",
        None,
        b"x",
        Some("malformed_request"),
    ),
    bad(b"ts.slot.\xc3", None, b"", Some("malformed_request")),
    bad(
        b"ts.range.p1",
        Some(b"NATS/1.0\r\n\xff: v\r\n\r\n"),
        b"",
        Some("malformed_request"),
    ),
    bad(
        b"ts.keys",
        Some(b"garbage\r\n\r\n"),
        b"",
        Some("malformed_request"),
    ),
    Bad {
        reply: Some(b"_INBOX.bad.\xff"),
        ..bad(b"ts.schedule.p1", None, b"x", None)
    },
    // Well-formed, but wrong for the service: typed refusals.
    bad(b"ts.schedule.a.b", None, b"x", Some("invalid_process")),
    bad(
        b"ts.schedule.p1",
        Some(b"NATS/1.0\r\nTs-Mode: eventually\r\n\r\n"),
        b"x",
        Some("unknown_mode"),
    ),
    bad(
        b"ts.schedule.p1",
        Some(b"NATS/1.0\r\nNats-Msg-Id: \x01\r\n\r\n"),
        b"x",
        Some("malformed"),
    ),
    bad(
        b"ts.range.p1",
        None,
        b"\xc1\xc1not msgpack",
        Some("malformed"),
    ),
    // Aimed into our own space: never answered.
    Bad {
        reply: Some(b"ts.log.p1"),
        ..bad(b"ts.schedule.p1", None, b"x", None)
    },
    Bad {
        reply: Some(b"$KV.TS_PROCESSES.p1"),
        ..bad(b"$SRV.PING", None, b"", None)
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_mixed_into_load_costs_no_connection_and_no_answer() -> Result<()> {
    let server = server()?;
    let a = InProcess::start(&server, Config::default(), vec![test_key(31)]).await?;
    let b = InProcess::start(&server, Config::default(), vec![test_key(31)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 2).await?;
    let client = Client::new(nats.clone(), Subjects::default());

    // Good load: 8 processes, 400 requests with ids, from 8 tasks at once.
    let good = (0..8).map(|t| {
        let client = client.clone();
        tokio::spawn(async move {
            let p = ProcessId::new(format!("good-{t}"))?;
            let mut slots = Vec::new();
            for i in 0..50 {
                let opts = Schedule {
                    message_id: Some(format!("g{t}-{i}")),
                    ..Schedule::default()
                };
                let r = client
                    .schedule(&p, Bytes::from(format!("good {t} {i}")), &opts)
                    .await?;
                slots.push(r.slot);
            }
            anyhow::Ok(slots)
        })
    });
    let good: Vec<_> = good.collect();

    // Bad load at the same time, over a raw connection, 10 rounds of every case.
    let mut raw = RawClient::connect(server.url()).await?;
    raw.subscribe("_INBOX.bad.>", 1).await?;
    raw.flush().await?;
    let mut expected = BTreeMap::new();
    let mut malformed_sent = 0;
    let mut answers = Vec::new();
    for round in 0..10 {
        for (i, case) in BAD.iter().enumerate() {
            let inbox = format!("_INBOX.bad.{round}.{i}");
            let reply = case.reply.unwrap_or(inbox.as_bytes());
            raw.send(&publish(case.subject, Some(reply), case.header, case.body))
                .await?;
            if let Some(code) = case.expect {
                if case.reply.is_none() {
                    expected.insert(inbox.clone(), code);
                }
            }
            if case.expect == Some("malformed_request") || case.reply == Some(b"_INBOX.bad.\xff") {
                malformed_sent += 1;
            }
        }
        answers.extend(raw.flush().await?);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let missing = expected.len().saturating_sub(answers.len());
    answers.extend(raw.collect(missing, Duration::from_secs(20)).await?);
    let mut got = BTreeMap::new();
    for m in &answers {
        let subject = String::from_utf8_lossy(&m.subject).to_string();
        got.insert(subject, m.header("Ts-Error").unwrap_or_default());
    }
    let want: BTreeMap<String, String> = expected
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    assert_eq!(
        got, want,
        "every bad request with a usable reply gets its typed error"
    );

    for g in good {
        let slots = g.await??;
        assert_eq!(
            slots,
            (0..50).collect::<Vec<_>>(),
            "every valid request answered, in order"
        );
    }
    // Nothing of the bad input was scheduled: p1 has no slot.
    assert!(read_log(server.url(), &ProcessId::new("p1")?)
        .await?
        .is_empty());

    // No replica lost its connection; the malformed requests were counted.
    let mut malformed_counted = 0;
    let mut seen = HashSet::new();
    for stats in service::ask_all(
        &nats,
        "STATS",
        "turnstile-scheduler",
        Duration::from_millis(500),
    )
    .await?
    {
        assert_eq!(stats["connects"], 1, "a scheduler reconnected: {stats}");
        malformed_counted += stats["malformed_requests"].as_u64().unwrap_or(0);
        seen.insert(stats["id"].to_string());
    }
    assert_eq!(seen.len(), 2);
    assert_eq!(malformed_counted, malformed_sent);
    a.stop().await?;
    b.stop().await?;
    Ok(())
}
