//! Bad input gets a typed error at once, nothing is written, and the service goes on.
//! These tests use a bare NATS client, as any language would, not the typed client.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;

use journal::client::{Client, Schedule};
use journal::subjects::Subjects;
use protocol::wire::RangeRequest;
use protocol::ProcessId;
use scheduler::Config;

use crate::support::*;

/// Sends a raw request and returns the `Ts-Error` code and the services-API status.
async fn raw(
    nats: &async_nats::Client,
    subject: &str,
    headers: HeaderMap,
    body: Bytes,
) -> anyhow::Result<Option<(String, String)>> {
    let req = async_nats::Request::new()
        .headers(headers)
        .payload(body)
        .timeout(Some(Duration::from_secs(5)));
    let msg = nats.send_request(subject.to_string(), req).await?;
    Ok(msg.headers.as_ref().and_then(|h| {
        let code = h.get("Ts-Error")?.as_str().to_string();
        let status = h.get("Nats-Service-Error-Code")?.as_str().to_string();
        Some((code, status))
    }))
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, *v);
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_typed_error_and_nothing_is_written() -> anyhow::Result<()> {
    let server = server()?;
    let url = server.url();
    let config = Config {
        max_body: 1000,
        ..Config::default()
    };
    let s = InProcess::start(&server, config, vec![test_key(10)]).await?;
    let nats = connect(url).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(connect(url).await?, Subjects::default());
    let p = ProcessId::new("strict")?;
    client
        .schedule(&p, Bytes::from("the only good one"), &Schedule::default())
        .await?;

    let long_id = "x".repeat(300);
    let cases: Vec<(&str, &str, HeaderMap, Bytes, &str, &str)> = vec![
        (
            "unknown mode",
            "ts.schedule.strict",
            headers(&[("Ts-Mode", "eventually")]),
            Bytes::from("b"),
            "unknown_mode",
            "400",
        ),
        (
            "oversized body",
            "ts.schedule.strict",
            HeaderMap::new(),
            Bytes::from(vec![7u8; 1001]),
            "too_large",
            "413",
        ),
        (
            "too long message id",
            "ts.schedule.strict",
            headers(&[("Nats-Msg-Id", &long_id)]),
            Bytes::from("b"),
            "malformed",
            "400",
        ),
        (
            "two-token process",
            "ts.schedule.a.b",
            HeaderMap::new(),
            Bytes::from("b"),
            "invalid_process",
            "400",
        ),
        (
            "bad process characters",
            "ts.schedule.a%b",
            HeaderMap::new(),
            Bytes::from("b"),
            "invalid_process",
            "400",
        ),
        (
            "disabled by request",
            "ts.schedule.strict",
            headers(&[("Ts-Mode", "disabled")]),
            Bytes::from("b"),
            "disabled",
            "403",
        ),
        (
            "range with garbage body",
            "ts.range.strict",
            HeaderMap::new(),
            Bytes::from_static(b"\xc1\xff garbage"),
            "malformed",
            "400",
        ),
        (
            "slot of a bad process",
            "ts.slot.a.b",
            HeaderMap::new(),
            Bytes::new(),
            "invalid_process",
            "400",
        ),
    ];
    for (name, subject, h, body, code, status) in cases {
        let got = raw(&nats, subject, h, body).await?;
        assert_eq!(got, Some((code.to_string(), status.to_string())), "{name}");
    }
    let reversed = RangeRequest {
        from: 5,
        to: Some(1),
        limit: None,
    };
    let got = raw(
        &nats,
        "ts.range.strict",
        HeaderMap::new(),
        reversed.encode()?.into(),
    )
    .await?;
    assert_eq!(got, Some(("invalid_range".to_string(), "400".to_string())));

    // Nothing was written, and the service still works.
    assert_eq!(read_log(url, &p).await?.len(), 1);
    let r = client
        .schedule(&p, Bytes::from(vec![1u8; 1000]), &Schedule::default())
        .await?;
    assert_eq!(r.slot, 1, "exactly max_body is accepted");
    s.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_is_discoverable_and_any_nats_client_can_schedule() -> anyhow::Result<()> {
    let server = server()?;
    let url = server.url();
    let s = InProcess::start(&server, Config::default(), vec![test_key(11)]).await?;
    let nats = connect(url).await?;
    wait_for_schedulers(&nats, 1).await?;
    let info = nats
        .request("$SRV.INFO.turnstile-scheduler", Bytes::new())
        .await?;
    let info: serde_json::Value = serde_json::from_slice(&info.payload)?;
    let names: Vec<&str> = info["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for want in ["schedule", "slot", "range", "keys"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // A plain request with a body and a header is all a client needs.
    let msg = nats
        .send_request(
            "ts.schedule.plain",
            async_nats::Request::new()
                .headers(headers(&[("content-type", "text/plain")]))
                .payload(Bytes::from("hi")),
        )
        .await?;
    let receipt = protocol::wire::Receipt::decode(&msg.payload)?;
    assert_eq!(
        (receipt.slot, receipt.headers.clone()),
        (
            0,
            vec![("content-type".to_string(), "text/plain".to_string())]
        )
    );
    assert!(receipt.check(Some(b"hi")).is_ok());
    let stats = nats
        .request("$SRV.STATS.turnstile-scheduler", Bytes::new())
        .await?;
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload)?;
    let schedule = stats["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "schedule")
        .cloned()
        .unwrap_or_default();
    assert_eq!(schedule["num_requests"], 1);
    s.stop().await?;
    Ok(())
}

/// A small deterministic generator (xorshift64*), so a failure can be replayed.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.next() as usize) % (max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn token(&mut self) -> String {
        const ALPHABET: &[u8] = b"abcXYZ019-_.*>%$\\\"";
        let n = 1 + (self.next() as usize) % 12;
        (0..n)
            .map(|_| ALPHABET[(self.next() as usize) % ALPHABET.len()] as char)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_garbage_on_every_endpoint_never_goes_unanswered_or_breaks_the_service(
) -> anyhow::Result<()> {
    let server = server()?;
    let url = server.url();
    let config = Config {
        max_body: 4096,
        ..Config::default()
    };
    let s = InProcess::start(&server, config, vec![test_key(15)]).await?;
    let nats = connect(url).await?;
    wait_for_schedulers(&nats, 1).await?;
    let mut noise = Noise(0x5eed_1234_abcd_0001);
    let kinds = ["schedule", "slot", "range", "keys"];
    for i in 0..400 {
        let kind = kinds[(noise.next() as usize) % kinds.len()];
        let token = noise.token();
        let subject = if kind == "keys" {
            "ts.keys".to_string()
        } else {
            format!("ts.{kind}.{token}")
        };
        if subject.contains(['*', '>']) || subject.ends_with('.') || subject.contains("..") {
            continue; // not a publishable subject; NATS refuses it before us
        }
        let mut h = HeaderMap::new();
        for _ in 0..(noise.next() % 3) {
            let name = ["Nats-Msg-Id", "Ts-Mode", "x-any"][(noise.next() as usize) % 3];
            let value: String = noise
                .bytes(40)
                .into_iter()
                .map(|b| (b'a' + b % 26) as char)
                .collect();
            h.insert(name, value.as_str());
        }
        let body = Bytes::from(noise.bytes(if i % 50 == 0 { 8000 } else { 300 }));
        let req = async_nats::Request::new()
            .headers(h)
            .payload(body)
            .timeout(Some(Duration::from_secs(5)));
        // Every request is answered (a timeout or "no responders" fails the test).
        let reply = nats.send_request(subject.clone(), req).await;
        assert!(
            reply.is_ok(),
            "request {i} on {subject} was not answered: {:?}",
            reply.err()
        );
    }
    // Still healthy: a good request gets its slot and the log verifies.
    let client = Client::new(connect(url).await?, Subjects::default());
    let p = ProcessId::new("after-noise")?;
    let r = client
        .schedule(&p, Bytes::from("fine"), &Schedule::default())
        .await?;
    assert_eq!(r.slot, 0);
    assert_eq!(verify(url, &p, &[&test_key(15)]).await?.faults, vec![]);
    s.stop().await?;
    Ok(())
}
