//! The services-API endpoints. The intake validates every request and refuses bad
//! ones at once with a typed error; valid scheduling requests go to their process's
//! actor. Reads (`slot`, `range`, `keys`) are answered from the log by short tasks.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::kv;
use futures::{StreamExt, TryStreamExt};
use service::Endpoint;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use journal::chain::Judged;
use journal::subjects;
use protocol::verify::LogVerifier;
use protocol::wire::{ErrorCode, Mode, ProcessConfig, RangePage, RangeRequest, SlotInfo};
use protocol::ProcessId;

use crate::actor::Job;
use crate::metrics::Metrics;
use crate::reply::{Refusal, Replier};
use crate::Shared;

/// Longest accepted message id, in bytes.
pub const MAX_MESSAGE_ID: usize = 256;
/// Most bytes of stored headers per message.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most entries in one range page.
pub const MAX_PAGE_ENTRIES: u32 = 1000;

/// The next request; after shutdown, the requests already delivered to this replica
/// (the endpoint is drained: no new ones come, none received is dropped), then none.
async fn next_or_stop(
    endpoint: &mut Endpoint,
    shutdown: &CancellationToken,
) -> Option<service::Request> {
    if !shutdown.is_cancelled() {
        tokio::select! {
            r = endpoint.next() => return r,
            _ = shutdown.cancelled() => {}
        }
    }
    if !endpoint.is_draining() {
        endpoint.drain().await;
    }
    tokio::time::timeout(DRAIN_DEADLINE, endpoint.next())
        .await
        .ok()
        .flatten()
}

/// How long a stopping replica waits for the requests already on their way to it.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes scheduling requests until shutdown.
pub(crate) async fn schedule_loop(
    shared: Arc<Shared>,
    mut endpoint: Endpoint,
    shutdown: CancellationToken,
) {
    while let Some(req) = next_or_stop(&mut endpoint, &shutdown).await {
        let reply = Replier::new(req);
        if let Some(why) = reply.malformed() {
            reply
                .refuse(Refusal::new(ErrorCode::MalformedRequest, why.to_string()))
                .await;
            continue;
        }
        match validate(&shared, reply.message()) {
            // A queue key costs a bucket round trip (or more): in a task of its own,
            // so the requests behind it do not wait for it.
            Ok((process, mut parts)) => match parts.queue_key.take() {
                Some(key) => {
                    let shared2 = Arc::clone(&shared);
                    shared.tracker.spawn(crate::queue::schedule_keyed(
                        shared2, process, key, reply, parts,
                    ));
                }
                None => submit(&shared, process, reply, parts).await,
            },
            Err(refusal) => reply.refuse(refusal).await,
        }
    }
}

/// Queues a validated request with its process's actor, or answers it `busy`.
pub(crate) async fn submit(
    shared: &Arc<Shared>,
    process: ProcessId,
    reply: Replier,
    parts: JobParts,
) {
    let job = Job {
        reply,
        message_id: parts.message_id,
        mode: parts.mode,
        headers: parts.headers,
        body: parts.body,
        admission: None,
        queued: tokio::time::Instant::now(),
    };
    if let Err((job, refusal)) = shared.actors.submit(shared, process, job) {
        if refusal.code == ErrorCode::Busy {
            Metrics::bump(&shared.metrics.busy);
        }
        job.reply.refuse(refusal).await;
    }
}

/// A validated scheduling request, before it gets its reply handle.
pub(crate) struct JobParts {
    pub(crate) message_id: Option<String>,
    pub(crate) mode: Mode,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: bytes::Bytes,
    /// The request's `Ts-Queue-Key`, checked.
    pub(crate) queue_key: Option<String>,
}

/// Checks one scheduling request: process, size, message id, mode, settings, keys.
fn validate(shared: &Shared, msg: &async_nats::Message) -> Result<(ProcessId, JobParts), Refusal> {
    let process = shared
        .subjects
        .process_of("schedule", msg.subject.as_str())
        .map_err(|e| Refusal::new(ErrorCode::InvalidProcess, e.to_string()))?;
    if msg.payload.len() > shared.limits.max_body {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!(
                "body is {} bytes; the maximum is {}",
                msg.payload.len(),
                shared.limits.max_body
            ),
        ));
    }
    let mut message_id = None;
    let mut requested = None;
    let mut queue_key = None;
    let mut headers = Vec::new();
    let mut header_bytes = 0;
    if let Some(h) = &msg.headers {
        // Control headers are matched whatever their case (some clients lower-case
        // names); two different values of one are refused, never one picked silently.
        let control = |wanted: &str| -> Result<Option<String>, Refusal> {
            let mut found: Option<String> = None;
            for (name, values) in h.iter() {
                let name: &str = name.as_ref();
                if !name.eq_ignore_ascii_case(wanted) {
                    continue;
                }
                for v in values {
                    match &found {
                        Some(f) if f != v.as_str() => {
                            return Err(Refusal::new(
                                ErrorCode::Malformed,
                                format!("header {wanted} given twice with different values"),
                            ))
                        }
                        _ => found = Some(v.as_str().to_string()),
                    }
                }
            }
            Ok(found)
        };
        for (name, _) in h.iter() {
            let name: &str = name.as_ref();
            let ours = [
                subjects::MSG_ID,
                subjects::MODE,
                subjects::QUEUE_KEY,
                subjects::EXECUTION_KEY,
            ];
            if name.to_ascii_lowercase().starts_with("ts-")
                && !ours.iter().any(|o| o.eq_ignore_ascii_case(name))
            {
                return Err(Refusal::new(
                    ErrorCode::Malformed,
                    format!("unknown control header {name}: Ts-* names are reserved (a request may carry Ts-Mode, Ts-Queue-Key and Ts-Execution-Key)"),
                ));
            }
        }
        if let Some(id) = control(subjects::MSG_ID)? {
            let id = id.as_str();
            if id.is_empty() || id.len() > MAX_MESSAGE_ID || id.chars().any(char::is_control) {
                return Err(Refusal::new(
                    ErrorCode::Malformed,
                    format!(
                        "Nats-Msg-Id must be 1-{MAX_MESSAGE_ID} bytes without control characters"
                    ),
                ));
            }
            message_id = Some(id.to_string());
        }
        if let Some(m) = control(subjects::MODE)? {
            requested = Some(
                m.to_ascii_lowercase()
                    .parse::<Mode>()
                    .map_err(|e| Refusal::new(ErrorCode::UnknownMode, e.to_string()))?,
            );
        }
        if let Some(k) = control(subjects::QUEUE_KEY)? {
            protocol::queue::check_key(&k)
                .map_err(|e| Refusal::new(ErrorCode::Malformed, e.to_string()))?;
            queue_key = Some(k);
        }
        // The execution key is stored with the message (the job's workers read it).
        if let Some(k) = control(subjects::EXECUTION_KEY)? {
            if !subjects::is_execution_key(&k) {
                return Err(Refusal::new(
                    ErrorCode::Malformed,
                    format!(
                        "{} must be 1-{} bytes without control characters",
                        subjects::EXECUTION_KEY,
                        subjects::MAX_EXECUTION_KEY
                    ),
                ));
            }
            header_bytes += subjects::EXECUTION_KEY.len() + k.len();
            headers.push((subjects::EXECUTION_KEY.to_string(), k));
        }
        for (name, values) in h.iter() {
            let name: &str = name.as_ref();
            if subjects::is_control_header(name) {
                continue;
            }
            for v in values {
                header_bytes += name.len() + v.as_str().len();
                headers.push((name.to_string(), v.as_str().to_string()));
            }
        }
    }
    // NATS header maps have no order; store them sorted, as the canonical encoding does.
    headers.sort();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("headers are {header_bytes} bytes; the maximum is {MAX_HEADER_BYTES}"),
        ));
    }
    // A queue key is stored in the entry, with its hold's token (at most 20 digits).
    let queue_bytes = queue_key.as_ref().map_or(0, |k| {
        subjects::QUEUE_KEY.len() + k.len() + subjects::QUEUE_HOLD.len() + 20
    });
    let request_bytes =
        msg.payload.len() + header_bytes + queue_bytes + message_id.as_ref().map_or(0, String::len);
    if request_bytes > shared.limits.max_request {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!(
                "body, stored headers and message id are {request_bytes} bytes; the maximum is {} (max_request_bytes in $SRV.INFO)",
                shared.limits.max_request
            ),
        ));
    }
    let pc = shared.process_config(&process);
    if pc.mode == Some(Mode::Disabled) {
        return Err(Refusal::new(
            ErrorCode::Disabled,
            format!("scheduling is disabled for process {process}"),
        ));
    }
    let mode = requested.or(pc.mode).unwrap_or(shared.config.default_mode);
    match mode {
        Mode::Disabled => {
            return Err(Refusal::new(
                ErrorCode::Disabled,
                "mode disabled refuses every request",
            ))
        }
        Mode::RemoteConfirmation if shared.remote.is_none() => {
            return Err(Refusal::new(
                ErrorCode::RemoteNotConfigured,
                "remote_confirmation needs a remote stream (--remote-stream); none is configured",
            ));
        }
        _ => {}
    }
    if let Err(id) = shared.keyring.select(&pc.keys) {
        return Err(Refusal::new(
            ErrorCode::MissingKey,
            format!("process {process} requires key {id}, which this scheduler does not hold"),
        ));
    }
    Ok((
        process,
        JobParts {
            message_id,
            mode,
            headers,
            body: msg.payload.clone(),
            queue_key,
        },
    ))
}

/// Serves a read-only endpoint until shutdown: each request is answered by `answer`
/// in a short task of its own, so a slow read never holds up the next request.
pub(crate) async fn read_loop<F, Fut>(
    shared: Arc<Shared>,
    mut endpoint: Endpoint,
    shutdown: CancellationToken,
    answer: F,
) where
    F: Fn(Arc<Shared>, async_nats::Message) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<u8>, Refusal>> + Send + 'static,
{
    while let Some(req) = next_or_stop(&mut endpoint, &shutdown).await {
        let shared = Arc::clone(&shared);
        shared.tracker.clone().spawn(async move {
            let reply = Replier::new(req);
            if let Some(why) = reply.malformed() {
                let r = Refusal::new(ErrorCode::MalformedRequest, why.to_string());
                return reply.refuse(r).await;
            }
            match answer(Arc::clone(&shared), reply.message().clone()).await {
                Ok(bytes) => reply.ok(bytes.into()).await,
                Err(r) => reply.refuse(r).await,
            }
        });
    }
}

/// Answers `<prefix>.slot.<process>` from the log's verified head (three leader
/// reads on an intact log; schemas/chain.md).
pub(crate) async fn slot(
    shared: Arc<Shared>,
    msg: async_nats::Message,
) -> Result<Vec<u8>, Refusal> {
    let process = shared
        .subjects
        .process_of("slot", msg.subject.as_str())
        .map_err(|e| Refusal::new(ErrorCode::InvalidProcess, e.to_string()))?;
    let loaded = journal::chain::load_head(&shared.reader, &process, &shared.trusted())
        .await
        .map_err(unavailable)?;
    for f in &loaded.faults {
        shared.fault(&process, f);
    }
    let info = SlotInfo {
        process: process.to_string(),
        slot: loaded.head_run.as_ref().map(|r| r.run.last_slot()),
        next_slot: loaded.point.next_slot,
        chain_head: loaded.point.prev,
        timestamp_ms: loaded
            .head_run
            .as_ref()
            .and_then(|r| r.run.entries.last())
            .map(|e| e.timestamp_ms),
    };
    info.encode().map_err(internal)
}

/// Answers `<prefix>.range.<process>` with one page of the chain (foreign messages
/// skipped); `next` says where the rest is.
pub(crate) async fn range(
    shared: Arc<Shared>,
    msg: async_nats::Message,
) -> Result<Vec<u8>, Refusal> {
    let process = shared
        .subjects
        .process_of("range", msg.subject.as_str())
        .map_err(|e| Refusal::new(ErrorCode::InvalidProcess, e.to_string()))?;
    let req = RangeRequest::decode(&msg.payload)
        .map_err(|e| Refusal::new(ErrorCode::Malformed, e.to_string()))?;
    if req.to.is_some_and(|to| to < req.from) {
        return Err(Refusal::new(
            ErrorCode::InvalidRange,
            format!("to ({:?}) is before from ({})", req.to, req.from),
        ));
    }
    let limit = req
        .limit
        .unwrap_or(MAX_PAGE_ENTRIES)
        .clamp(1, MAX_PAGE_ENTRIES) as usize;
    let byte_budget = shared.limits.max_run_bytes;
    let mut page = RangePage {
        process: process.to_string(),
        entries: Vec::new(),
        next: None,
    };
    let trusted = shared.trusted();
    let loaded = journal::chain::load_head(&shared.reader, &process, &trusted)
        .await
        .map_err(unavailable)?;
    let Some(last) = loaded.point.next_slot.checked_sub(1) else {
        return page.encode().map_err(internal);
    };
    let to = req.to.unwrap_or(last).min(last);
    if req.from > to {
        return page.encode().map_err(internal);
    }
    let (mut verifier, mut seq) = if req.from == 0 {
        (
            LogVerifier::from_genesis(process.clone(), trusted, vec![]),
            1,
        )
    } else {
        let start = shared
            .reader
            .locate(&process, req.from)
            .await
            .map_err(unavailable)?
            .unwrap_or(loaded.tail_seq + 1);
        (
            LogVerifier::resume(process.clone(), trusted, vec![], None, None),
            start,
        )
    };
    let mut want = req.from;
    let mut bytes = 0usize;
    'runs: while want <= to {
        let Some(msg) = shared
            .reader
            .next_message(&process, seq)
            .await
            .map_err(unavailable)?
        else {
            break;
        };
        seq = msg.seq + 1;
        let stored = match journal::chain::judge(&mut verifier, msg) {
            Judged::Chain { run, .. } => run,
            Judged::Foreign(_) => continue,
        };
        for e in stored.run.entries {
            if e.slot < want {
                continue;
            }
            if e.slot != want {
                return Err(Refusal::new(
                    ErrorCode::Unavailable,
                    format!("the log has lost slot {want}; run turnstile verify"),
                ));
            }
            if e.slot > to {
                break 'runs;
            }
            let cost = entry_cost(&e);
            if page.entries.len() >= limit
                || (bytes + cost > byte_budget && !page.entries.is_empty())
            {
                page.next = Some(want);
                break 'runs;
            }
            bytes += cost;
            page.entries.push(e);
            want += 1;
        }
    }
    if page.next.is_none() && want <= to {
        // The log ended before `to` although the head said otherwise: never truncate silently.
        page.next = Some(want);
    }
    page.encode().map_err(internal)
}

/// What an entry costs in a page's MessagePack, generously: every byte it carries
/// (body, id, headers) plus its fixed fields and framing.
fn entry_cost(e: &protocol::wire::Entry) -> usize {
    e.body.len()
        + e.message_id.len()
        + e.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 16)
            .sum::<usize>()
        + 160
}

/// Answers `<prefix>.keys` with every published key (MessagePack array of `PublishedKey`).
pub(crate) async fn keys_loop(
    shared: Arc<Shared>,
    mut endpoint: Endpoint,
    store: kv::Store,
    shutdown: CancellationToken,
) {
    while let Some(req) = next_or_stop(&mut endpoint, &shutdown).await {
        let reply = Replier::new(req);
        if let Some(why) = reply.malformed() {
            let r = Refusal::new(ErrorCode::MalformedRequest, why.to_string());
            reply.refuse(r).await;
            continue;
        }
        let answer = match journal::keyring::fetch(&store).await {
            Ok(keys) => rmp_serde::to_vec_named(&keys)
                .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string())),
            Err(e) => Err(unavailable(e)),
        };
        match answer {
            Ok(bytes) => reply.ok(bytes.into()).await,
            Err(r) => reply.refuse(r).await,
        }
    }
    drop(shared);
}

/// Reads every process's settings (before the endpoints open, so a disabled process
/// is never scheduled by a scheduler that just started).
pub(crate) async fn load_process_configs(
    store: &kv::Store,
) -> journal::Result<HashMap<String, ProcessConfig>> {
    let err =
        |e: &(dyn std::error::Error + 'static)| journal::Error::nats("load process settings", e);
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| err(&e))?
        .try_collect()
        .await
        .map_err(|e| err(&e))?;
    let mut out = HashMap::new();
    for k in keys {
        if let Some(bytes) = store.get(&k).await.map_err(|e| err(&e))? {
            match ProcessConfig::decode(&bytes) {
                Ok(c) => {
                    out.insert(k, c);
                }
                Err(e) => warn!(process = %k, error = %e, "ignoring malformed process settings"),
            }
        }
    }
    Ok(out)
}

/// Follows the published keys until shutdown: a key published later (another
/// replica's) is trusted from then on. Our own keys stay trusted whatever happens to
/// the bucket.
pub(crate) async fn watch_keys(shared: Arc<Shared>, store: kv::Store, shutdown: CancellationToken) {
    // With history: a key published between our first read and this watch is not missed.
    let mut watch = match store.watch_with_history(">").await {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch published keys; keys published later need a restart");
            return;
        }
    };
    loop {
        let entry = tokio::select! {
            e = watch.next() => e,
            _ = shutdown.cancelled() => return,
        };
        let Some(entry) = entry else { return };
        let Ok(entry) = entry else { continue };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        let Ok(key) = protocol::wire::PublishedKey::decode(&entry.value) else {
            warn!(key_id = %entry.key, "ignoring a malformed published key");
            continue;
        };
        let trust = journal::keyring::trust(std::slice::from_ref(&key));
        if trust.is_empty() || key.key_id != entry.key {
            warn!(key_id = %entry.key, "ignoring a published key whose id does not match it");
            continue;
        }
        if let (Ok(mut t), Ok(pk)) = (
            shared.trusted.write(),
            <[u8; 32]>::try_from(key.public_key.as_slice()),
        ) {
            t.insert(pk);
        }
    }
}

/// Follows changes to process settings until shutdown.
pub(crate) async fn watch_process_configs(
    shared: Arc<Shared>,
    store: kv::Store,
    shutdown: CancellationToken,
) {
    let mut watch = match store.watch_with_history(">").await {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch process settings; changes need a restart");
            return;
        }
    };
    loop {
        let entry = tokio::select! {
            e = watch.next() => e,
            _ = shutdown.cancelled() => return,
        };
        let Some(entry) = entry else { return };
        let Ok(entry) = entry else { continue };
        let revision = entry.revision;
        let Ok(mut map) = shared.processes.write() else {
            return;
        };
        match entry.operation {
            kv::Operation::Put => match ProcessConfig::decode(&entry.value) {
                Ok(c) => {
                    debug!(process = %entry.key, mode = ?c.mode, "process settings changed");
                    map.insert(entry.key, c);
                }
                Err(e) => {
                    warn!(process = %entry.key, error = %e, "ignoring malformed process settings")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                map.remove(&entry.key);
            }
        }
        drop(map);
        // Applied (the map is written) before it is reported.
        shared
            .metrics
            .settings_revision
            .fetch_max(revision, std::sync::atomic::Ordering::Relaxed);
    }
}

fn unavailable(e: journal::Error) -> Refusal {
    Refusal::new(ErrorCode::Unavailable, e.to_string())
}

fn internal(e: protocol::Error) -> Refusal {
    Refusal::new(ErrorCode::Internal, e.to_string())
}
