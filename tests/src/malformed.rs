//! Messages async-nats cannot parse: any client may publish them, and nats-server forwards
//! them as they are. Unpatched, async-nats 0.51 fails the whole connection on the first
//! one (every request in flight is lost); with shared/patches/async-nats-0.51.0.patch it
//! delivers each, marked malformed (ARCHITECTURE.md, "Patched dependency: async-nats").

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectOptions, Event, StatusCode};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Where the probes go: under `_INBOX.`, which the anonymous user may publish and
/// subscribe to (deploy/accounts.conf).
const PREFIX: &str = "_INBOX.probe";

/// One probe: what the raw client publishes, and what the subscriber must see.
struct Probe {
    /// The subject token after [`PREFIX`] (raw bytes).
    token: &'static [u8],
    reply: Option<&'static [u8]>,
    /// The header block, or `None` for a `PUB` without headers.
    header: Option<&'static [u8]>,
    /// Also the name of the probe in assertion messages.
    payload: &'static str,
    malformed: bool,
}

const fn probe(
    token: &'static [u8],
    header: Option<&'static [u8]>,
    payload: &'static str,
    malformed: bool,
) -> Probe {
    Probe {
        token,
        reply: None,
        header,
        payload,
        malformed,
    }
}

const PROBES: &[Probe] = &[
    probe(
        b"1",
        Some(b"NATS/1.0\r\nX: \xff\r\n\r\n"),
        "value-0xff",
        true,
    ),
    probe(
        b"2",
        Some(b"NATS/1.0\r\nno-colon\r\n\r\n"),
        "no-colon",
        true,
    ),
    probe(b"3", Some(b"NATS/2.0\r\nX: y\r\n\r\n"), "version-2.0", true),
    probe(
        b"4",
        Some(b"NATS/1.0\r\nA B: y\r\n\r\n"),
        "name-space",
        true,
    ),
    probe(b"5", Some(b"NATS/1.0 abc\r\n\r\n"), "status-abc", true),
    // `str::lines` leaves a lone CR inside a line; unpatched, the value panics the
    // connection task (it never comes back).
    probe(b"6", Some(b"NATS/1.0\r\nX: a\rb\r\n\r\n"), "value-cr", true),
    probe(b"\xff", None, "subject-0xff", true),
    Probe {
        reply: Some(b"reply.\xff"),
        ..probe(b"8", None, "reply-0xff", true)
    },
    // A header block of nothing but its end.
    probe(b"9", Some(b"\r\n"), "empty-block", true),
    // Well-formed: the smallest header block, and a status any client may write.
    probe(b"10", Some(b"NATS/1.0\r\n\r\n"), "no-headers", false),
    probe(b"11", Some(b"NATS/1.0 503\r\n\r\n"), "status-503", false),
    probe(
        b"12",
        Some(b"NATS/1.0 503 No Responders\r\n\r\n"),
        "status-503-text",
        false,
    ),
    probe(
        b"13",
        Some(b"NATS/1.0\r\nTs-Probe: good\r\n\r\n"),
        "good",
        false,
    ),
];

/// The protocol line(s) of `p`, as a raw client publishes it.
fn publish(p: &Probe) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(if p.header.is_some() {
        b"HPUB "
    } else {
        b"PUB "
    });
    out.extend_from_slice(PREFIX.as_bytes());
    out.push(b'.');
    out.extend_from_slice(p.token);
    if let Some(reply) = p.reply {
        out.push(b' ');
        out.extend_from_slice(reply);
    }
    let header = p.header.unwrap_or_default();
    let total = header.len() + p.payload.len();
    let sizes = match p.header {
        Some(_) => format!(" {} {total}\r\n", header.len()),
        None => format!(" {total}\r\n"),
    };
    out.extend_from_slice(sizes.as_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(p.payload.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// Reads from `raw` until a `PONG` (the server has processed everything before it).
async fn until_pong(raw: &mut TcpStream) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == b"PONG\r\n") {
        let n = timeout(Duration::from_secs(10), raw.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "server closed the raw connection");
        seen.extend_from_slice(&buf[..n]);
        anyhow::ensure!(
            !seen.windows(4).any(|w| w == b"-ERR"),
            "server refused: {}",
            String::from_utf8_lossy(&seen)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_messages_are_delivered_marked_and_the_connection_stays() -> anyhow::Result<()> {
    let server = harness::NatsServer::start()?;
    let disconnects = Arc::new(AtomicUsize::new(0));
    let client = ConnectOptions::new()
        .event_callback({
            let disconnects = disconnects.clone();
            move |event| {
                let disconnects = disconnects.clone();
                async move {
                    if matches!(event, Event::Disconnected) {
                        disconnects.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
        .connect(server.url())
        .await?;
    let mut sub = client.subscribe(format!("{PREFIX}.>")).await?;
    client.flush().await?;

    let address = server.url().trim_start_matches("nats://");
    let mut raw = TcpStream::connect(address).await?;
    raw.write_all(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\
          \"no_responders\":true,\"protocol\":1}\r\nPING\r\n",
    )
    .await?;
    until_pong(&mut raw).await?;
    let mut all = PROBES.iter().flat_map(publish).collect::<Vec<u8>>();
    all.extend_from_slice(b"PING\r\n");
    raw.write_all(&all).await?;
    until_pong(&mut raw).await?;

    for p in PROBES {
        let name = p.payload;
        let m = timeout(Duration::from_secs(5), sub.next())
            .await
            .map_err(|_| anyhow::anyhow!("{name}: not delivered"))?
            .ok_or_else(|| anyhow::anyhow!("{name}: subscription ended"))?;
        assert_eq!(m.payload, p.payload.as_bytes(), "{name}: out of order");
        let subject = format!("{PREFIX}.{}", String::from_utf8_lossy(p.token));
        assert_eq!(m.subject.as_str(), subject, "{name}");
        assert_eq!(m.is_malformed(), p.malformed, "{name}: {m:?}");
        assert_eq!(m.malformed_reason().is_some(), p.malformed, "{name}");
        if p.malformed {
            // A non-UTF-8 reply is dropped; a bad header block leaves no headers.
            assert_eq!(m.reply, None, "{name}");
            assert_eq!(m.status, None, "{name}");
            assert!(m.headers.is_none(), "{name}: {m:?}");
            continue;
        }
        let headers = m.headers.as_ref().expect("well-formed headers");
        match name {
            // A client may write a status line: it stays a status, never the mark.
            "status-503" => assert_eq!(
                (m.status, m.description.as_deref()),
                (Some(StatusCode::NO_RESPONDERS), None)
            ),
            "status-503-text" => assert_eq!(
                (m.status, m.description.as_deref()),
                (Some(StatusCode::NO_RESPONDERS), Some("No Responders"))
            ),
            "good" => assert_eq!(headers.get("Ts-Probe").map(|v| v.as_str()), Some("good")),
            _ => assert!(headers.is_empty(), "{name}"),
        }
    }

    client.flush().await?;
    assert_eq!(
        disconnects.load(Ordering::SeqCst),
        0,
        "the connection failed"
    );
    Ok(())
}
