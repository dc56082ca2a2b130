//! The continuous audit. Every message that lands on a log subject this replica
//! serves (a process with a live actor here) is judged by that process's actor
//! before its next write — runs of other replicas and anything else published
//! there alike (schemas/chain.md). After every reconnect to NATS each live actor
//! re-checks its log from its last verified run to the end: a server restart may
//! have lost what it had stored. Faults become events on `<prefix>.events.fault`,
//! counters and error lines ([`crate::Shared::fault`]).
//!
//! The watch is a headers-only ordered consumer over `<prefix>.log.*` starting at
//! the messages new when the scheduler starts: per message it costs one headers
//! delivery and a map lookup; the actor reads and checks the run itself only when it
//! is beyond its head (not its own write).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Shared;

/// Messages one pull of the audit's consumer asks for: at most this many runs (up to
/// ~1 MiB each) wait in the server for this replica.
const AUDIT_BATCH: i64 = 64;

/// Watches the log for messages landing on subjects this replica serves.
pub(crate) async fn watch_log(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let consumer = shared
            .log_stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: shared.subjects.log_all(),
                deliver_policy: consumer::DeliverPolicy::New,
                headers_only: true,
                // Headers only, yet the server holds a copy of each whole run until
                // it is sent: a bounded number per pull (the library's default: 500).
                max_batch: AUDIT_BATCH,
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "audit: cannot follow the log; retrying");
                    sleep_or_stop(&shutdown, &mut backoff).await;
                    continue;
                }
            },
            Err(e) => {
                warn!(error = %e, "audit: cannot follow the log; retrying");
                sleep_or_stop(&shutdown, &mut backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        loop {
            let next = tokio::select! {
                m = messages.next() => m,
                _ = shutdown.cancelled() => return,
            };
            let Some(Ok(m)) = next else { break };
            let Ok(info) = m.info() else { continue };
            if let Some(process) = shared.subjects.process_of_log(m.subject.as_str()) {
                shared.actors.landed(&process, info.stream_sequence);
            }
        }
        // The ordered consumer gave up (it recreates itself on most errors): start anew.
        sleep_or_stop(&shutdown, &mut backoff).await;
    }
}

/// Asks every live actor to re-check its log after each reconnect of the core
/// connection.
pub(crate) async fn watch_reconnects(shared: Arc<Shared>, shutdown: CancellationToken) {
    let stats = shared.core.statistics();
    let mut seen = stats.connects.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown.cancelled() => return,
        }
        let now = stats.connects.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            info!("reconnected to NATS: re-checking every live process's log");
            shared.actors.recheck_all();
        }
    }
}

async fn sleep_or_stop(shutdown: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = shutdown.cancelled() => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}
