//! Server checks and idempotent creation of the stream and buckets, each step retried
//! while the server (a cluster still electing leaders) fails transiently.

use async_nats::jetstream::{self, kv, stream};

use crate::retry::Retry;
use crate::subjects::Subjects;
use crate::{Error, Result};

/// The oldest nats-server turnstile accepts (ANCHORS.md: safe expected-sequence
/// checks on replicated streams arrived in 2.11, atomic batches in 2.12).
pub const MIN_SERVER: (u64, u64, u64) = (2, 12, 0);

/// Parses "2.12.1", "v2.12.1" or "2.12.0-beta.1" into (major, minor, patch).
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let v = v.trim().trim_start_matches('v');
    let core = v.split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// Refuses a server older than [`MIN_SERVER`] with a clear message.
pub fn check_server(client: &async_nats::Client) -> Result<String> {
    let info = client.server_info();
    let found = info.version.clone();
    match parse_version(&found) {
        Some(v) if v >= MIN_SERVER => {}
        _ => {
            let (a, b, c) = MIN_SERVER;
            return Err(Error::ServerTooOld {
                found,
                required: format!("{a}.{b}.{c}"),
            });
        }
    }
    if !info.jetstream {
        return Err(Error::NoJetStream);
    }
    Ok(found)
}

/// How the log stream and the buckets are created.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Stream replicas (1 for a single server, 3 in a cluster).
    pub replicas: usize,
    /// How transient failures (a cluster still electing leaders) are retried.
    pub retry: Retry,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            replicas: 1,
            retry: Retry::default(),
        }
    }
}

/// The log stream's configuration: append-only (no deletes, no purges), kept forever,
/// direct gets allowed for readers, atomic batches allowed for the writer.
pub fn log_stream_config(subjects: &Subjects, options: &LogOptions) -> stream::Config {
    stream::Config {
        name: subjects.log_stream(),
        description: Some(
            "turnstile assignment log: one signed run of assignments per message".into(),
        ),
        subjects: vec![subjects.log_all()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        num_replicas: options.replicas,
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
        allow_atomic_publish: true,
        ..Default::default()
    }
}

/// Why an existing stream cannot be the log (`None`: it can): it must take every log
/// subject and keep every message (limits retention, nothing discarded as old).
pub fn log_conflict(subjects: &Subjects, existing: &stream::Config) -> Option<String> {
    let name = &existing.name;
    if !existing
        .subjects
        .iter()
        .any(|s| covers(s, &subjects.log_all()))
    {
        return Some(format!(
            "stream {name} exists with subjects {:?}, not {:?}: it cannot be the log; fix or remove it, or choose another --prefix",
            existing.subjects,
            subjects.log_all()
        ));
    }
    if existing.retention != stream::RetentionPolicy::Limits {
        return Some(format!(
            "stream {name} exists with {:?} retention, which removes messages: the log needs limits retention; fix or remove it",
            existing.retention
        ));
    }
    None
}

/// Whether every subject `pattern` matches is also matched by the subject filter
/// `filter` (`ts.log.>` covers `ts.log.*`; `ts.log.a` does not).
fn covers(filter: &str, pattern: &str) -> bool {
    let mut f = filter.split('.');
    let mut p = pattern.split('.');
    loop {
        match (f.next(), p.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Creates the log stream if it is missing and returns it (its cached info current).
/// An existing stream is used as it is, unless it cannot be the log
/// ([`log_conflict`]: [`Error::Misconfigured`]); if it allows deletes or purges, or
/// has other replicas than asked, a warning says so. Transient failures are retried
/// with `options.retry`.
pub async fn ensure_log(
    js: &jetstream::Context,
    subjects: &Subjects,
    options: &LogOptions,
) -> Result<stream::Stream> {
    let config = log_stream_config(subjects, options);
    let stream = options
        .retry
        .run("create log stream", || async {
            js.get_or_create_stream(config.clone())
                .await
                .map_err(|e| Error::nats("create log stream", &e))
        })
        .await?;
    let info = stream.cached_info().clone();
    if let Some(conflict) = log_conflict(subjects, &info.config) {
        return Err(Error::Misconfigured(conflict));
    }
    if !info.config.deny_delete || !info.config.deny_purge {
        tracing::warn!(stream = %info.config.name, "log stream allows deletes or purges; the log is only append-only if it denies both");
    }
    if info.config.num_replicas != options.replicas {
        tracing::warn!(stream = %info.config.name, replicas = info.config.num_replicas, asked = options.replicas, "the existing log stream has other replicas than asked; change them with `nats stream edit`");
    }
    if info.config.allow_atomic_publish {
        return Ok(stream);
    }
    // A stream made by an older turnstile: turn atomic batches on if we may.
    let mut config = info.config.clone();
    config.allow_atomic_publish = true;
    let updated = options
        .retry
        .run("enable atomic batches", || async {
            js.update_stream(config.clone())
                .await
                .map_err(|e| Error::nats("enable atomic batches", &e))
        })
        .await;
    if let Err(e) = updated {
        tracing::warn!(error = %e, "cannot enable atomic batches on the log stream");
        return Ok(stream);
    }
    options
        .retry
        .run("log stream info", || async {
            js.get_stream(&info.config.name)
                .await
                .map_err(|e| Error::nats("log stream info", &e))
        })
        .await
}

/// The alarm stream's configuration: alarm histories (`<prefix>.alarms.rec.<id>`), the
/// due index (`<prefix>.alarms.due.…`, purged as alarms finish), sweep checkpoints and
/// dead letters; kept until removed, direct gets for reads.
pub fn alarms_stream_config(subjects: &Subjects, options: &LogOptions) -> stream::Config {
    stream::Config {
        name: subjects.alarms_stream(),
        description: Some("turnstile alarms: histories, due index, dead letters".into()),
        subjects: vec![subjects.alarms_all()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        num_replicas: options.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates the alarm stream if it is missing and returns it; transient failures are
/// retried with `options.retry`.
pub async fn ensure_alarms(
    js: &jetstream::Context,
    subjects: &Subjects,
    options: &LogOptions,
) -> Result<stream::Stream> {
    let config = alarms_stream_config(subjects, options);
    options
        .retry
        .run("create alarm stream", || async {
            js.get_or_create_stream(config.clone())
                .await
                .map_err(|e| Error::nats("create alarm stream", &e))
        })
        .await
}

/// Length of the alarm-loaders' firing key.
pub const FIRING_KEY_LEN: usize = 32;

/// The alarm-loaders' firing key: [`FIRING_KEY_LEN`] secret bytes every loader of the
/// deployment shares, kept at `<prefix>.alarms.firing-key` in the alarm stream (of the
/// TURNSTILE account: no client reads it). The first loader makes it (a write that
/// expects the subject empty; a loader that loses that race reads the winner's); every
/// later one reads it. The key is the *first* message there, and the only one: a
/// second message, or one of another length, is a misconfiguration, an error, never
/// followed or replaced (a new key would change the id of every firing under way, and
/// two loaders on two keys would fire a taken-over alarm twice). Transient failures,
/// a lost race whose winner's write is not readable yet among them, are retried with
/// `options.retry`.
pub async fn ensure_firing_key(
    js: &jetstream::Context,
    alarms: &stream::Stream,
    subjects: &Subjects,
    options: &LogOptions,
) -> Result<[u8; FIRING_KEY_LEN]> {
    let subject = subjects.alarm_firing_key();
    let what = "read or make the firing key";
    options
        .retry
        .run(what, || async {
            if let Some(key) = read_firing_key(alarms, &subject).await? {
                return Ok(key);
            }
            let key = random_key();
            let publish = jetstream::message::PublishMessage::build()
                .payload(bytes::Bytes::copy_from_slice(&key))
                .expected_last_subject_sequence(0);
            let ack = match js.send_publish(subject.clone(), publish).await {
                Ok(f) => f.await,
                Err(e) => Err(e),
            };
            match ack {
                Ok(_) => Ok(key),
                // Another loader made it first: read theirs; a write of theirs still in
                // flight (not readable yet) is waited for by the retry, not spun on.
                Err(e) if crate::jserr::is_conflict(&e) => read_firing_key(alarms, &subject)
                    .await?
                    .ok_or_else(|| Error::Nats {
                        op: what,
                        failure: crate::retry::Failure::TimedOut,
                        reason: format!("another loader's write of {subject} is not readable yet"),
                    }),
                Err(e) => Err(Error::nats(what, &e)),
            }
        })
        .await
}

/// The firing key stored at `subject`, none if nothing is; an error if what is there
/// is not exactly one message of [`FIRING_KEY_LEN`] bytes.
pub async fn read_firing_key(
    alarms: &stream::Stream,
    subject: &str,
) -> Result<Option<[u8; FIRING_KEY_LEN]>> {
    let what = "read the firing key";
    let first = match alarms.get_first_raw_message_by_subject(subject, 1).await {
        Ok(m) => m,
        Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => {
            return Ok(None)
        }
        Err(e) => return Err(Error::nats(what, &e)),
    };
    let last = alarms
        .get_last_raw_message_by_subject(subject)
        .await
        .map_err(|e| Error::nats(what, &e))?;
    if last.sequence != first.sequence {
        return Err(Error::Misconfigured(format!(
            "{subject} holds more than one message (sequences {} and {}): the firing key is \
             the first, and only an operator may remove what came after it",
            first.sequence, last.sequence
        )));
    }
    <[u8; FIRING_KEY_LEN]>::try_from(&first.payload[..])
        .map(Some)
        .map_err(|_| {
            Error::Misconfigured(format!(
                "the firing key at {subject} (sequence {}) is {} bytes, not \
                 {FIRING_KEY_LEN}: an operator must restore it",
                first.sequence,
                first.payload.len()
            ))
        })
}

/// [`FIRING_KEY_LEN`] bytes from the operating system's generator: two random (v4)
/// UUIDs, 244 random bits, spread over the key by BLAKE3.
fn random_key() -> [u8; FIRING_KEY_LEN] {
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    seed[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    blake3::derive_key("turnstile/alarms/firing-key/v1", &seed)
}

/// How long the work stream remembers a job's message id (`Nats-Msg-Id` =
/// `<group>/<process>:<slot>`): a feeder that resumes from its last checkpoint hands out
/// again what it fed after it, and the stream drops those copies within this window
/// (later copies are marked `Ts-Refed` and looked up before they run).
pub const WORK_DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// The work stream's configuration: one message per job, removed once acknowledged
/// (work-queue retention), deduplicated by job id.
pub fn work_stream_config(subjects: &Subjects, options: &LogOptions) -> stream::Config {
    stream::Config {
        name: subjects.work_stream(),
        description: Some("turnstile jobs: one message per assignment, per worker group".into()),
        subjects: vec![subjects.work_all()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::New,
        num_replicas: options.replicas,
        duplicate_window: WORK_DUPLICATE_WINDOW,
        allow_direct: true,
        ..Default::default()
    }
}

/// The results stream's configuration: every job's history (one subject a job).
pub fn results_stream_config(subjects: &Subjects, options: &LogOptions) -> stream::Config {
    stream::Config {
        name: subjects.results_stream(),
        description: Some("turnstile job results: every outcome of every job".into()),
        subjects: vec![subjects.results_all()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        num_replicas: options.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates `config`'s stream if it is missing and returns it; transient failures are
/// retried with `options.retry`.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
    options: &LogOptions,
) -> Result<stream::Stream> {
    options
        .retry
        .run("create stream", || async {
            js.get_or_create_stream(config.clone())
                .await
                .map_err(|e| Error::nats("create stream", &e))
        })
        .await
}

/// Whether `stream` accepts atomic batch publishes (from the info it was opened with:
/// [`ensure_log`] returns it current).
pub fn allows_atomic(stream: &stream::Stream) -> bool {
    stream.cached_info().config.allow_atomic_publish
}

/// Creates (or opens) the per-process settings bucket.
pub async fn ensure_processes(
    js: &jetstream::Context,
    subjects: &Subjects,
    options: &LogOptions,
) -> Result<kv::Store> {
    ensure_bucket(
        js,
        subjects.processes_bucket(),
        "turnstile per-process settings",
        options,
        None,
    )
    .await
}

/// Creates (or opens) the public-keys bucket.
pub async fn ensure_keys(
    js: &jetstream::Context,
    subjects: &Subjects,
    options: &LogOptions,
) -> Result<kv::Store> {
    ensure_bucket(
        js,
        subjects.keys_bucket(),
        "turnstile scheduler public keys",
        options,
        None,
    )
    .await
}

/// How long the server keeps a marker that says a key was deleted or expired in the
/// ownership bucket (the bucket's `subject_delete_marker_ttl`; the markers ownership
/// writes itself carry the same TTL). Long enough for every watcher to see it; once it
/// is gone the key has no message at all, which means the same (free).
pub const OWNERSHIP_MARKER_TTL: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Creates (or opens) the ownership bucket: file storage, per-key TTL enabled and
/// subject delete markers (`allow_msg_ttl`, `subject_delete_marker_ttl`: nats-server
/// 2.11), so a lease expires on the server's clock and every watcher sees it expire.
/// An existing bucket is opened as it is (`ownership` refuses one without per-key TTL).
pub async fn ensure_ownership(
    js: &jetstream::Context,
    subjects: &Subjects,
    options: &LogOptions,
) -> Result<kv::Store> {
    ensure_lease_bucket(
        js,
        subjects.ownership_bucket(),
        "turnstile cluster-wide ownership: members and partition leases",
        options,
    )
    .await
}

/// Creates (or opens) the execution keys' bucket, a lease bucket like the ownership
/// bucket (per-key TTL, delete markers, one message a key): a key held by a running
/// job, renewed while it runs, expired by the server when its holder died.
pub async fn ensure_exec_keys(
    js: &jetstream::Context,
    subjects: &Subjects,
    options: &LogOptions,
) -> Result<kv::Store> {
    ensure_lease_bucket(
        js,
        subjects.exec_keys_bucket(),
        "turnstile execution keys: one lease per key held by a running job",
        options,
    )
    .await
}

/// A bucket of leases: file storage, per-key TTL and subject delete markers
/// (`allow_msg_ttl`, `subject_delete_marker_ttl`: nats-server 2.11), history 1.
async fn ensure_lease_bucket(
    js: &jetstream::Context,
    bucket: String,
    description: &str,
    options: &LogOptions,
) -> Result<kv::Store> {
    options
        .retry
        .run("open a lease bucket", || async {
            if let Ok(store) = js.get_key_value(&bucket).await {
                return Ok(store);
            }
            let created = js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: description.into(),
                    // One message a key: nats-server raises a message's TTL to the marker
                    // TTL unless a subject keeps a single message (nats-server #6741,
                    // #6818), and a lease is only ever its newest write.
                    history: 1,
                    storage: stream::StorageType::File,
                    num_replicas: options.replicas,
                    limit_markers: Some(OWNERSHIP_MARKER_TTL),
                    ..Default::default()
                })
                .await;
            match created {
                Ok(store) => Ok(store),
                // Another member created it meanwhile: open that one.
                Err(e) => js
                    .get_key_value(&bucket)
                    .await
                    .map_err(|_| Error::nats("create a lease bucket", &e)),
            }
        })
        .await
}

/// Opens the workers' bucket (feed checkpoints, job control), creating it if missing.
pub async fn ensure_workers(
    js: &jetstream::Context,
    subjects: &Subjects,
    options: &LogOptions,
) -> Result<kv::Store> {
    ensure_bucket(
        js,
        subjects.workers_bucket(),
        "turnstile workers: feed checkpoints and job control",
        options,
        Some(RELEASE_MARKER_TTL),
    )
    .await
}

/// Opens the queue-keys bucket (holds of queued jobs' queue keys), creating it if
/// missing.
pub async fn ensure_queue_keys(
    js: &jetstream::Context,
    subjects: &Subjects,
    options: &LogOptions,
) -> Result<kv::Store> {
    ensure_bucket(
        js,
        subjects.queue_keys_bucket(),
        "turnstile queue keys: a hold per key of a job not yet started",
        options,
        Some(RELEASE_MARKER_TTL),
    )
    .await
}

/// The configuration turnstile creates its (non-lease) buckets with: file storage,
/// five revisions a key and, with `markers`, per-message TTLs, so that a release's
/// marker does not stay for good ([`purge_released`]). nats-server raises a message's
/// TTL to `markers` in such a bucket (it keeps more than one message a key), and it
/// leaves no marker for a removed marker, so a purge's marker goes after `markers`
/// and the key is left with no message.
pub fn bucket_config(
    bucket: &str,
    description: &str,
    options: &LogOptions,
    markers: Option<std::time::Duration>,
) -> kv::Config {
    kv::Config {
        bucket: bucket.to_string(),
        description: description.into(),
        history: 5,
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        limit_markers: markers,
        ..Default::default()
    }
}

/// Opens `bucket`, or creates it when the server says it does not exist; retried
/// with `options.retry` while that fails transiently.
async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: String,
    description: &str,
    options: &LogOptions,
    markers: Option<std::time::Duration>,
) -> Result<kv::Store> {
    let config = bucket_config(&bucket, description, options, markers);
    options
        .retry
        .run("create bucket", || async {
            let missing = match js.get_key_value(&bucket).await {
                Ok(store) => return Ok(store),
                Err(e) => Error::nats("open bucket", &e),
            };
            if !matches!(&missing, Error::Nats { failure, .. } if failure.is_not_found()) {
                return Err(missing);
            }
            match js.create_key_value(config.clone()).await {
                Ok(store) => Ok(store),
                // Another replica may have created it between our get and our create.
                Err(e) => js
                    .get_key_value(&bucket)
                    .await
                    .map_err(|_| Error::nats("create bucket", &e)),
            }
        })
        .await
}

/// How long the server keeps the marker a released queue-key hold or a forgotten
/// cancel leaves ([`purge_released`]): long enough for every watcher and for an
/// operator looking at recent releases; a key without a message means the same
/// (free, no cancel).
pub const RELEASE_MARKER_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Purges `key` (if `revision` is given, only while that is its last revision),
/// leaving one marker that the server removes after [`RELEASE_MARKER_TTL`], so a
/// bucket of queue keys or cancels keeps nothing of a key once it is released. A
/// bucket made before turnstile asked for per-message TTLs does not allow them: the
/// marker then stays for good, as it always did (`nats stream edit <stream>
/// --allow-msg-ttl` turns them on).
pub async fn purge_released(
    kv: &kv::Store,
    key: &str,
    revision: Option<u64>,
) -> std::result::Result<(), kv::PurgeError> {
    purge_released_within(kv, key, revision, RELEASE_MARKER_TTL).await
}

/// [`purge_released`], the marker kept for `ttl` (whole seconds, at least one; the
/// server raises it to the bucket's marker TTL, [`bucket_config`]).
pub async fn purge_released_within(
    kv: &kv::Store,
    key: &str,
    revision: Option<u64>,
    ttl: std::time::Duration,
) -> std::result::Result<(), kv::PurgeError> {
    let ttl = ttl.max(std::time::Duration::from_secs(1));
    match (kv.stream.cached_info().config.allow_message_ttl, revision) {
        (false, revision) => kv.purge_expect_revision(key, revision).await,
        (true, None) => kv.purge_with_ttl(key, ttl).await,
        (true, Some(r)) => kv.purge_expect_revision_with_ttl(key, r, ttl).await,
    }
}

/// Opens an existing bucket without creating it (readers, the CLI).
pub async fn open_bucket(js: &jetstream::Context, bucket: &str) -> Result<kv::Store> {
    js.get_key_value(bucket)
        .await
        .map_err(|e| Error::nats("open bucket", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_compare() {
        assert_eq!(parse_version("2.12.1"), Some((2, 12, 1)));
        assert_eq!(parse_version("v2.15.0-beta.2"), Some((2, 15, 0)));
        assert_eq!(parse_version("2.9"), Some((2, 9, 0)));
        assert_eq!(parse_version("junk"), None);
        assert!(parse_version("2.9.10").unwrap() < MIN_SERVER);
        assert!(parse_version("2.12.0").unwrap() >= MIN_SERVER);
        assert!(parse_version("3.0.0").unwrap() >= MIN_SERVER);
    }

    #[test]
    fn an_existing_stream_is_the_log_only_if_it_takes_its_subjects_and_keeps_everything() {
        let subjects = Subjects::default();
        let ours = log_stream_config(&subjects, &LogOptions::default());
        assert_eq!(log_conflict(&subjects, &ours), None);
        let mut elsewhere = ours.clone();
        elsewhere.subjects = vec!["elsewhere.>".into()];
        assert!(log_conflict(&subjects, &elsewhere).is_some());
        let mut wider = ours.clone();
        wider.subjects = vec!["other.>".into(), "ts.>".into()];
        assert_eq!(log_conflict(&subjects, &wider), None);
        let mut narrower = ours.clone();
        narrower.subjects = vec!["ts.log.a".into()];
        assert!(log_conflict(&subjects, &narrower).is_some());
        let mut work_queue = ours.clone();
        work_queue.retention = stream::RetentionPolicy::WorkQueue;
        assert!(log_conflict(&subjects, &work_queue).is_some());
        // Other replicas or deletes allowed are warned about, not refused.
        let mut other = ours;
        other.num_replicas = 3;
        other.deny_delete = false;
        assert_eq!(log_conflict(&subjects, &other), None);
    }
}
