//! Server checks and idempotent creation of the stream and buckets.

use async_nats::jetstream::{self, kv, stream};

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

/// How the log stream is created.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Stream replicas (1 for a single server, 3 in a cluster).
    pub replicas: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { replicas: 1 }
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

/// Creates the log stream if it is missing and returns it. An existing stream is used
/// as it is; if it allows deletes or purges a warning says so.
pub async fn ensure_log(
    js: &jetstream::Context,
    subjects: &Subjects,
    options: &LogOptions,
) -> Result<stream::Stream> {
    let config = log_stream_config(subjects, options);
    let mut stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| Error::JetStream {
            op: "create log stream",
            reason: e.to_string(),
        })?;
    let info = stream.info().await.map_err(|e| Error::JetStream {
        op: "log stream info",
        reason: e.to_string(),
    })?;
    if !info.config.deny_delete || !info.config.deny_purge {
        tracing::warn!(stream = %info.config.name, "log stream allows deletes or purges; the log is only append-only if it denies both");
    }
    if !info.config.allow_atomic_publish {
        // A stream made by an older turnstile: turn atomic batches on if we may.
        let mut config = info.config.clone();
        config.allow_atomic_publish = true;
        if let Err(e) = js.update_stream(config).await {
            tracing::warn!(error = %e, "cannot enable atomic batches on the log stream");
        }
    }
    Ok(stream)
}

/// Whether `stream` accepts atomic batch publishes (reads its info).
pub async fn allows_atomic(stream: &stream::Stream) -> bool {
    let mut stream = stream.clone();
    match stream.info().await {
        Ok(info) => info.config.allow_atomic_publish,
        Err(_) => false,
    }
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
    let bucket = subjects.ownership_bucket();
    let store = match js.get_key_value(&bucket).await {
        Ok(store) => store,
        Err(_) => {
            let created = js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: "turnstile cluster-wide ownership: members and partition leases"
                        .into(),
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
                Ok(store) => store,
                Err(e) => js
                    .get_key_value(&bucket)
                    .await
                    .map_err(|_| Error::JetStream {
                        op: "create ownership bucket",
                        reason: e.to_string(),
                    })?,
            }
        }
    };
    Ok(store)
}

async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: String,
    description: &str,
    options: &LogOptions,
) -> Result<kv::Store> {
    if let Ok(store) = js.get_key_value(&bucket).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: bucket.clone(),
            description: description.into(),
            history: 5,
            storage: stream::StorageType::File,
            num_replicas: options.replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another replica may have created it between our get and our create.
        Err(e) => js
            .get_key_value(&bucket)
            .await
            .map_err(|_| Error::JetStream {
                op: "create bucket",
                reason: e.to_string(),
            }),
    }
}

/// Opens an existing bucket without creating it (readers, the CLI).
pub async fn open_bucket(js: &jetstream::Context, bucket: &str) -> Result<kv::Store> {
    js.get_key_value(bucket)
        .await
        .map_err(|e| Error::JetStream {
            op: "open bucket",
            reason: e.to_string(),
        })
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
}
