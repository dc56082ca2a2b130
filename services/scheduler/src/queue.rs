//! Queue keys on the scheduler's path (ARCHITECTURE.md "Queue keys"): a request
//! with `Ts-Queue-Key` takes the key's hold in the queue-keys bucket by an atomic
//! create before it is assigned, or is refused `queue_key_held` at once. Requests
//! without the header never come here (no bucket access on their path).
//!
//! The hold's token (the create's revision) goes into the entry as `Ts-Queue-Hold`.
//! Once the request is answered: a receipt records the slot in the hold (an update
//! expecting the revision we know; if the worker released it meanwhile, the update
//! fails and nothing comes back); a refusal that means nothing was written deletes
//! the hold; an answer whose write's fate is unknown leaves it pending, and a pending
//! hold older than [`stale_after`] is resolved from the log by the next request
//! that meets it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use journal::{setup, subjects};
use protocol::queue::{hold_key, Hold};
use protocol::wire::ErrorCode;
use protocol::ProcessId;

use crate::reply::{Answer, Refusal, Replier};
use crate::Shared;

/// Most runs the resolution of a stale hold reads back from the head.
const MAX_WALK: usize = 4096;

/// How old a pending hold must be before a scheduler resolves it from the log: the
/// write deadline (every request is answered by then, unless its replica died)
/// plus a minute for clocks that disagree.
pub(crate) fn stale_after(shared: &Shared) -> Duration {
    shared.config.write_deadline + Duration::from_secs(60)
}

/// A hold this request may use.
#[derive(Debug, Clone)]
struct Taken {
    /// The bucket key.
    name: String,
    /// The token written into the entry.
    token: u64,
    /// The entry's revision when we last knew it.
    revision: u64,
    /// Created by this request (false: the hold of an earlier request with the same
    /// message id, let through to deduplication).
    owned: bool,
    /// The hold as it stands at `revision`.
    hold: Hold,
}

/// Whether a refusal means that nothing of the request was written (its hold can go).
fn nothing_written(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Busy
            | ErrorCode::LogFull
            | ErrorCode::Disabled
            | ErrorCode::MissingKey
            | ErrorCode::TooLarge
            | ErrorCode::Malformed
            | ErrorCode::InvalidProcess
    )
}

/// Takes the hold of `key` for a request, submits it with the key and the hold's
/// token as stored headers, waits for its answer and settles the hold.
pub(crate) async fn schedule_keyed(
    shared: Arc<Shared>,
    process: ProcessId,
    key: String,
    reply: Replier,
    mut parts: crate::intake::JobParts,
) {
    let taken = match acquire(&shared, &process, &key, parts.message_id.as_deref()).await {
        Ok(t) => t,
        Err(refusal) => {
            if refusal.code == ErrorCode::QueueKeyHeld {
                crate::metrics::Metrics::bump(&shared.metrics.queue_key_held);
            }
            return reply.refuse(refusal).await;
        }
    };
    parts
        .headers
        .push((subjects::QUEUE_KEY.to_string(), key.clone()));
    parts
        .headers
        .push((subjects::QUEUE_HOLD.to_string(), taken.token.to_string()));
    parts.headers.sort();
    let (tx, rx) = oneshot::channel();
    crate::intake::submit(&shared, process, reply.tapped(tx), parts).await;
    let answer = rx.await.ok();
    settle(&shared, &taken, answer).await;
}

/// After the answer: record the slot, delete the hold, or leave it pending.
async fn settle(shared: &Shared, taken: &Taken, answer: Option<Answer>) {
    let kv = &shared.queue_keys;
    match answer {
        Some(Answer::Assigned {
            slot,
            duplicate: false,
        }) => {
            // Assigned: the hold now names its slot — an update expecting the revision
            // we know, so a hold the worker freed meanwhile is never brought back.
            if taken.hold.slot.is_some() {
                return;
            }
            let Ok(bytes) = taken.hold.assigned(taken.revision, slot).encode() else {
                return;
            };
            if let Err(e) = kv.update(&taken.name, bytes.into(), taken.revision).await {
                debug!(hold = %taken.name, error = %e, "hold not updated (released meanwhile?)");
            }
        }
        // The message id was scheduled before, with its own hold (or none): ours is
        // in no entry.
        Some(Answer::Assigned {
            duplicate: true, ..
        }) if taken.owned => release(kv, taken).await,
        Some(Answer::Refused(code)) if nothing_written(code) && taken.owned => {
            release(kv, taken).await;
        }
        // Unknown fate (unavailable, remote_timeout, internal, an unanswered
        // handle): left pending; resolved from the log once stale.
        _ => {}
    }
}

async fn release(kv: &kv::Store, taken: &Taken) {
    if let Err(e) = setup::purge_released(kv, &taken.name, Some(taken.revision)).await {
        debug!(hold = %taken.name, error = %e, "hold not removed (changed meanwhile)");
    }
}

/// Takes the hold of `key` in `process`, or refuses the request.
async fn acquire(
    shared: &Shared,
    process: &ProcessId,
    key: &str,
    message_id: Option<&str>,
) -> Result<Taken, Refusal> {
    let kv = &shared.queue_keys;
    let name = hold_key(process, key);
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        Refusal::new(ErrorCode::Unavailable, format!("queue key: {what}: {e}"))
    };
    // The revision the create expects: 0 (no message), or the marker a release left.
    let mut expected = 0;
    for _ in 0..4 {
        let now = (shared.clock)();
        let pending = Hold::pending(key, now, message_id.map(str::to_string));
        let value = pending
            .encode()
            .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
        // The create: one publish expecting the key's last revision.
        match kv.update(&name, value.into(), expected).await {
            Ok(revision) => {
                return Ok(Taken {
                    name,
                    token: revision,
                    revision,
                    owned: true,
                    hold: pending,
                })
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::TimedOut => {
                // Fate unknown: if it landed, the hold is pending and a retry with
                // the same message id uses it (or it goes stale).
                return Err(unavailable("take the hold", &e));
            }
            // Refused: the key has a message (a hold, or a release's marker).
            Err(_) => {}
        }
        let entry = kv
            .entry(&name)
            .await
            .map_err(|e| unavailable("read the hold", &e))?;
        let Some(entry) = entry else {
            expected = 0;
            continue;
        };
        if entry.operation != kv::Operation::Put {
            expected = entry.revision; // free: created over the marker
            continue;
        }
        let hold = match Hold::decode(&entry.value) {
            Ok(h) => h,
            Err(e) => {
                // Not a hold any turnstile wrote: it would block the key forever.
                warn!(hold = %name, error = %e, "removing a queue-key hold that does not decode");
                // The next round reads what is there (the purge's marker) again.
                let _ = setup::purge_released(kv, &name, Some(entry.revision)).await;
                continue;
            }
        };
        if message_id.is_some() && hold.message_id.as_deref() == message_id {
            // A retry of the request that holds it: deduplication answers it (or it
            // is written now, with the same token).
            return Ok(Taken {
                name,
                token: hold.token(entry.revision),
                revision: entry.revision,
                owned: false,
                hold,
            });
        }
        let bound = u64::try_from(stale_after(shared).as_millis()).unwrap_or(u64::MAX);
        if hold.is_stale(now, bound) {
            let token = hold.token(entry.revision);
            match find_token(
                shared,
                process,
                token,
                hold.created_ms.saturating_sub(bound),
            )
            .await
            {
                Ok(Some(slot)) => {
                    // Written after all: the hold is that job's.
                    if let Ok(bytes) = hold.assigned(entry.revision, slot).encode() {
                        let _ = kv.update(&name, bytes.into(), entry.revision).await;
                    }
                    return Err(held(key, &hold.assigned(entry.revision, slot)));
                }
                Ok(None) => {
                    warn!(hold = %name, token, "a stale queue-key hold whose request is not in the log: removed");
                    let _ = setup::purge_released(kv, &name, Some(entry.revision)).await;
                    continue;
                }
                Err(e) => return Err(unavailable("resolve a stale hold", &e)),
            }
        }
        return Err(held(key, &hold));
    }
    Err(Refusal::new(
        ErrorCode::Unavailable,
        "queue key: the hold kept changing; retry",
    ))
}

fn held(key: &str, hold: &Hold) -> Refusal {
    let by = match hold.slot {
        Some(s) => format!("the job at slot {s}, not started yet"),
        None => "a request being scheduled now".to_string(),
    };
    Refusal::new(
        ErrorCode::QueueKeyHeld,
        format!("queue key {key:?} is held by {by}"),
    )
}

/// The slot of the entry of `process` that carries hold token `token`, reading the
/// chain back from its verified head through runs no older than `since_ms` (at
/// most [`MAX_WALK`] runs).
async fn find_token(
    shared: &Shared,
    process: &ProcessId,
    token: u64,
    since_ms: u64,
) -> journal::Result<Option<u64>> {
    let trusted = shared.trusted();
    let loaded = journal::chain::load_head(&shared.reader, process, &trusted).await?;
    let Some(head) = loaded.head_run else {
        return Ok(None);
    };
    let wanted = token.to_string();
    let mut run = head.run;
    for _ in 0..MAX_WALK {
        for e in &run.entries {
            if e.headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case(subjects::QUEUE_HOLD) && *v == wanted)
            {
                return Ok(Some(e.slot));
            }
        }
        let newest = run.entries.last().map_or(0, |e| e.timestamp_ms);
        if newest < since_ms || run.prev_seq == 0 {
            return Ok(None);
        }
        let Some(msg) = shared.reader.message_at(process, run.prev_seq).await? else {
            return Ok(None);
        };
        match msg.decode() {
            Ok(r) if protocol::verify::check_run(&r, process, &trusted, &[]).is_ok() => run = r,
            _ => return Ok(None),
        }
    }
    Ok(None)
}
