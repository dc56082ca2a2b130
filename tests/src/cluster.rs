//! A three-node JetStream cluster (`harness::NatsCluster`): an R3 stream across a
//! leader's death, and the scheduler started on a cluster that has just formed.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use harness::NatsCluster;

use crate::support::*;

/// Publishes `payload` with the message id `id`, retrying what a leader change does to
/// a publish (no responders, timeouts, a lost connection) for up to 60 s; the id makes
/// a retry of a write that did land a duplicate the stream drops.
async fn publish_retrying(js: &jetstream::Context, subject: &str, id: &str) -> Result<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            js.publish_with_headers(subject.to_string(), headers, Bytes::from(id.to_string()))
                .await?
                .await
                .map_err(anyhow::Error::from)
        };
        match attempt.await {
            Ok(ack) => return Ok(ack.sequence),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, id, "publish failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("publishing {id}")),
        }
    }
}

/// The stream's leader, waiting up to 30 s for one that is not `not`.
async fn leader_other_than(
    cluster: &NatsCluster,
    stream: &str,
    not: Option<usize>,
) -> Result<usize> {
    for _ in 0..300 {
        if let Ok(Some(l)) = cluster.stream_leader(stream).await {
            if Some(l) != not {
                return Ok(l);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("stream {stream} had no leader other than {not:?} within 30 s")
}

/// Every payload stored in `stream`, read back by sequence from its leader.
async fn payloads(js: &jetstream::Context, name: &str) -> Result<BTreeSet<String>> {
    let mut stream = js.get_stream(name).await?;
    let last = stream.info().await?.state.last_sequence;
    let mut out = BTreeSet::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await?;
        out.insert(String::from_utf8(m.payload.to_vec())?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_keeps_taking_writes_after_its_leader_is_killed_and_keeps_them_all(
) -> Result<()> {
    let mut cluster = NatsCluster::start(3)?;
    let js = jetstream::new(connect(&cluster.url_as(Role::Operator)).await?);
    let name = "R3_PROBE";
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec!["probe.>".into()],
        num_replicas: 3,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;

    let ids = |range: std::ops::Range<usize>| range.map(|i| format!("m{i:03}"));
    for id in ids(0..50) {
        publish_retrying(&js, "probe.a", &id).await?;
    }
    let first = leader_other_than(&cluster, name, None).await?;
    cluster.kill(first);
    // Writes go on while (and after) the survivors elect a new leader.
    for id in ids(50..100) {
        publish_retrying(&js, "probe.a", &id).await?;
    }
    let second = leader_other_than(&cluster, name, Some(first)).await?;
    assert_ne!(second, first);
    let expected: BTreeSet<String> = ids(0..100).collect();
    assert_eq!(payloads(&js, name).await?, expected);
    assert_eq!(js.get_stream(name).await?.info().await?.state.messages, 100);

    // The killed node comes back in place (same ports, same store) and catches up.
    cluster.restart(first)?;
    let node = jetstream::new(connect(&cluster.node_url_as(first, Role::Operator)).await?);
    let mut caught_up = false;
    for _ in 0..300 {
        let info = node.get_stream(name).await?.info().await?.clone();
        let replicas = info.cluster.map(|c| c.replicas).unwrap_or_default();
        if replicas.len() == 2 && replicas.iter().all(|r| r.current && !r.offline) {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(caught_up, "node {first} did not catch up within 30 s");
    Ok(())
}
