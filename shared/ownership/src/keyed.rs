//! Leases on named keys, taken on demand: an exclusive lock per key, cluster-wide,
//! with the same mechanism as the partition leases (see the crate docs) but without a
//! group or an assignment — whoever creates the key first holds it.
//!
//! - **Acquire**: a write that expects the key's last revision to be a delete/expiry
//!   marker, or nothing (`Nats-Expected-Last-Subject-Sequence`), with a per-key TTL of
//!   one lease. Of two, exactly one wins. Its revision is the lease's fencing
//!   [`Token`]: every later holder of the key has a greater one.
//! - **Renew**: every lease/3, a write expecting our last revision (refused: the
//!   lease is lost — expired, or taken after expiry). The holder counts its lease as
//!   lost at its own deadline, the send time of its last acknowledged write (the
//!   acquiring one, then each renewal) + lease − lease/5, before the server (which
//!   counts from the later store time, the TTL rounded up to whole seconds) can free
//!   it.
//! - **Release**: a delete marker expecting our last revision.
//! - **A dead holder** stops renewing; the server expires the key one lease after its
//!   last write and places a marker every watcher sees ([`Locks::watch`]).
//!
//! A lease gives liveness, not safety: a holder paused past its deadline may wake and
//! act. So a side effect made under a key should be fenced by the token: the resource
//! keeps the greatest token it has seen and refuses a smaller one, or the holder checks
//! [`Locks::is_current`] (narrows the window) — the crate docs' contract.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use journal::setup::OWNERSHIP_MARKER_TTL;

use crate::lease::Token;
use crate::member::{ttl_secs, write_key, Write, Writer};
use crate::{Error, Result};

/// Free revisions remembered (then forgotten all at once: a miss costs one read).
const MAX_REMEMBERED: usize = 65_536;

/// The value of a held key (a wire type: other holders and operators read it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Who holds it (e.g. an instance id).
    pub holder: String,
    /// What for, free text (e.g. the job).
    #[serde(default)]
    pub note: String,
    /// The lease's token; absent in the acquiring write, whose own revision it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
}

/// A key as stored now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// Nobody holds it: no message (`revision` 0) or a delete/expiry marker.
    Free {
        /// The marker's revision (0: none).
        revision: u64,
    },
    /// Held.
    Held {
        /// The last write's revision.
        revision: u64,
        /// The holder's token.
        token: Token,
        /// The record (holder `""` if it does not parse).
        record: Record,
    },
}

impl KeyState {
    /// A key's state from one of its messages.
    pub fn of(operation: kv::Operation, revision: u64, value: &[u8]) -> KeyState {
        match operation {
            kv::Operation::Put => {
                let record = serde_json::from_slice::<Record>(value).unwrap_or(Record {
                    holder: String::new(),
                    note: String::new(),
                    token: None,
                });
                KeyState::Held {
                    revision,
                    token: Token(record.token.unwrap_or(revision)),
                    record,
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => KeyState::Free { revision },
        }
    }
}

/// What a try to acquire found.
#[derive(Debug)]
pub enum Acquire {
    /// Ours.
    Held(KeyLease),
    /// Someone holds it.
    Busy {
        /// Its last write's revision.
        revision: u64,
        /// Its holder's token.
        token: Token,
        /// Its record.
        record: Record,
    },
}

/// The keys of one bucket, leased for `lease` each. Cheap to clone.
#[derive(Clone)]
pub struct Locks {
    inner: Arc<Inner>,
}

/// What [`Locks`] shares between its clones (nothing of it is public).
pub struct Inner {
    js: jetstream::Context,
    store: kv::Store,
    lease: Duration,
    ttl: u64,
    timeout: Duration,
    /// Keys last seen free, with their marker's revision (what a create expects).
    free: Mutex<HashMap<String, u64>>,
}

impl std::ops::Deref for Locks {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks")
            .field("bucket", &self.store.name)
            .field("lease", &self.lease)
            .finish()
    }
}

impl Locks {
    /// Leases of `lease` (1 s ..= 1 h) on the keys of `store`, a bucket made by
    /// `journal::setup` for leases (per-key TTL, delete markers, history 1: checked).
    pub async fn new(js: jetstream::Context, store: kv::Store, lease: Duration) -> Result<Locks> {
        if lease < Duration::from_secs(1) || lease > Duration::from_secs(3600) {
            return Err(Error::Config(format!(
                "lease {lease:?}: 1 s ..= 1 h (nats-server's per-message TTL counts whole seconds)"
            )));
        }
        let mut stream = store.stream.clone();
        let info = stream.info().await.map_err(|e| Error::JetStream {
            op: "lease bucket info",
            reason: e.to_string(),
        })?;
        let c = &info.config;
        if !c.allow_message_ttl
            || c.subject_delete_marker_ttl.is_none()
            || c.max_messages_per_subject != 1
        {
            return Err(Error::BucketConfig(store.name.clone()));
        }
        Ok(Locks {
            inner: Arc::new(Inner {
                js,
                store,
                lease,
                ttl: ttl_secs(lease),
                timeout: lease / 3,
                free: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The lease.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    async fn publish(&self, key: &str, expect: u64, delete: bool, payload: Bytes) -> Write {
        let ttl = if delete {
            OWNERSHIP_MARKER_TTL.as_secs()
        } else {
            self.ttl
        };
        let headers = Writer::headers(Some(expect), ttl, delete);
        write_key(&self.js, &self.store, key, headers, payload, self.timeout).await
    }

    /// `key` as stored now.
    pub async fn read(&self, key: &str) -> Result<KeyState> {
        let entry = tokio::time::timeout(self.timeout, self.store.entry(key))
            .await
            .map_err(|_| Error::JetStream {
                op: "read a key",
                reason: "timed out".into(),
            })?
            .map_err(|e| Error::JetStream {
                op: "read a key",
                reason: e.to_string(),
            })?;
        Ok(match entry {
            None => KeyState::Free { revision: 0 },
            Some(e) => KeyState::of(e.operation, e.revision, &e.value),
        })
    }

    /// Whether `token` is still the lease on `key` (a fence check for a side effect:
    /// false once the lease expired or was taken by a later holder).
    pub async fn is_current(&self, key: &str, token: Token) -> Result<bool> {
        Ok(matches!(self.read(key).await?, KeyState::Held { token: t, .. } if t == token))
    }

    /// Remembers that `key` was seen free at marker `revision` (a watch saw it), so the
    /// next create expects it without reading first.
    pub fn saw_free(&self, key: &str, revision: u64) {
        if let Ok(mut f) = self.free.lock() {
            if f.len() >= MAX_REMEMBERED {
                f.clear();
            }
            f.insert(key.to_string(), revision);
        }
    }

    fn known_free(&self, key: &str) -> u64 {
        self.free
            .lock()
            .ok()
            .and_then(|f| f.get(key).copied())
            .unwrap_or(0)
    }

    /// Every change of every key from now on (puts, deletes, expiries).
    pub async fn watch(&self) -> Result<kv::Watch> {
        self.store.watch_all().await.map_err(|e| Error::JetStream {
            op: "watch the lease bucket",
            reason: e.to_string(),
        })
    }

    /// Tries once to take `key` for `holder` (`note`: what for, shown to others). Held:
    /// renewed in the background until released or lost. An error: the outcome is
    /// unknown (a create that landed unseen is an orphan that expires after one lease).
    pub async fn try_acquire(&self, key: &str, holder: &str, note: &str) -> Result<Acquire> {
        let record = Record {
            holder: holder.to_string(),
            note: note.to_string(),
            token: None,
        };
        let body = Bytes::from(serde_json::to_vec(&record).unwrap_or_default());
        let mut expect = self.known_free(key);
        // A stale "free" costs one refusal and a read; the read's answer is tried once.
        for _ in 0..3 {
            // The lease counts from the send: the server's TTL counts from the later
            // store, so an answer that comes late cannot stretch it past the server's.
            let sent = Instant::now();
            let outcome = self.publish(key, expect, false, body.clone()).await;
            let seen = match outcome {
                Write::Done(revision) => {
                    return Ok(Acquire::Held(self.start(key, revision, &record, sent)))
                }
                Write::Refused => self.read(key).await?,
                Write::Unknown(reason) => match self.read(key).await {
                    // Our create landed after all.
                    Ok(KeyState::Held {
                        revision,
                        record: r,
                        ..
                    }) if r == record => {
                        return Ok(Acquire::Held(self.start(key, revision, &record, sent)))
                    }
                    Ok(KeyState::Free { .. }) | Err(_) => {
                        return Err(Error::JetStream {
                            op: "acquire a key",
                            reason,
                        })
                    }
                    Ok(s) => s,
                },
            };
            match seen {
                KeyState::Free { revision } => expect = revision,
                KeyState::Held {
                    revision,
                    token,
                    record,
                } => {
                    return Ok(Acquire::Busy {
                        revision,
                        token,
                        record,
                    })
                }
            }
        }
        Err(Error::JetStream {
            op: "acquire a key",
            reason: "the key changed under every try".into(),
        })
    }

    /// A lease taken by a write sent at `sent`.
    fn start(&self, key: &str, revision: u64, record: &Record, sent: Instant) -> KeyLease {
        if let Ok(mut f) = self.free.lock() {
            f.remove(key);
        }
        let token = Token(revision);
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let deadline = sent + self.lease - self.lease / 5;
        let (deadline_tx, deadline_rx) = watch::channel(deadline);
        let task = tokio::spawn(renew(
            self.clone(),
            Renewing {
                key: key.to_string(),
                holder: record.clone(),
                token,
            },
            revision,
            deadline_tx,
            lost.clone(),
            stop.clone(),
        ));
        KeyLease {
            locks: self.clone(),
            key: key.to_string(),
            token,
            lost,
            deadline: deadline_rx,
            stop,
            task: Some(task),
        }
    }

    /// Renews `token` last written at `revision`.
    async fn renew_once(&self, key: &str, token: Token, revision: u64, holder: &Record) -> Renewal {
        let mut record = holder.clone();
        record.token = Some(token.get());
        let body = Bytes::from(serde_json::to_vec(&record).unwrap_or_default());
        match self.publish(key, revision, false, body).await {
            Write::Done(r) => Renewal::Extended(r),
            Write::Unknown(reason) => Renewal::Unknown(reason),
            Write::Refused => match self.read(key).await {
                // A renewal of ours whose answer was lost had landed.
                Ok(KeyState::Held {
                    revision: r,
                    token: t,
                    record: rec,
                }) if t == token && rec.holder == holder.holder && r > revision => {
                    Renewal::Adopted(r)
                }
                Ok(_) => Renewal::Refused,
                Err(e) => Renewal::Unknown(e.to_string()),
            },
        }
    }

    /// Deletes `key`, expecting `revision` to be its last write.
    async fn delete(&self, key: &str, revision: u64) -> Released {
        match self.publish(key, revision, true, Bytes::new()).await {
            Write::Done(marker) => {
                self.saw_free(key, marker);
                Released::Released
            }
            Write::Refused => Released::Lost,
            Write::Unknown(_) => Released::Unknown,
        }
    }
}

enum Renewal {
    Extended(u64),
    Adopted(u64),
    Refused,
    Unknown(String),
}

/// Keeps a lease: renews every lease/3; gives it up (`lost`) when a renewal is refused
/// or its local deadline passes. Returns the last revision written while still held
/// (stopped by `stop`), or `None` once lost.
/// What a renewal writes.
struct Renewing {
    key: String,
    holder: Record,
    token: Token,
}

async fn renew(
    locks: Locks,
    Renewing { key, holder, token }: Renewing,
    mut revision: u64,
    deadline_tx: watch::Sender<Instant>,
    lost: CancellationToken,
    stop: CancellationToken,
) -> Option<u64> {
    let every = locks.lease / 3;
    let mut deadline = *deadline_tx.borrow();
    let mut next = Instant::now() + every;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Some(revision),
            _ = tokio::time::sleep_until(next.min(deadline)) => {}
        }
        if Instant::now() >= deadline {
            lost.cancel();
            return None;
        }
        let sent = Instant::now();
        next = sent + every;
        match locks.renew_once(&key, token, revision, &holder).await {
            Renewal::Extended(r) => {
                revision = r;
                deadline = sent + locks.lease - locks.lease / 5;
                let _ = deadline_tx.send(deadline);
            }
            Renewal::Adopted(r) => revision = r,
            Renewal::Refused => {
                lost.cancel();
                return None;
            }
            Renewal::Unknown(reason) => {
                tracing::debug!(%key, "renewal unknown: {reason}");
            }
        }
    }
}

/// A held key: renewed in the background until [`KeyLease::release`] or until lost.
/// Dropped without a release: it stops renewing and the key expires after the lease.
#[derive(Debug)]
pub struct KeyLease {
    locks: Locks,
    key: String,
    token: Token,
    lost: CancellationToken,
    deadline: watch::Receiver<Instant>,
    stop: CancellationToken,
    task: Option<JoinHandle<Option<u64>>>,
}

/// How a release ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// Deleted: the key is free.
    Released,
    /// It was not ours any more (lost before: expired, taken after expiry).
    Lost,
    /// The delete's outcome is unknown: the key expires after the lease at the latest.
    Unknown,
}

impl KeyLease {
    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing token: the acquiring write's revision; greater for every later holder.
    pub fn token(&self) -> Token {
        self.token
    }

    /// Whether it still holds as far as this holder knows (not lost, not past its
    /// local deadline).
    pub fn is_current(&self) -> bool {
        !self.lost.is_cancelled() && Instant::now() < *self.deadline.borrow()
    }

    /// Completes when the lease is lost: a renewal refused (it expired, or was taken
    /// after expiry) or the local deadline passed without one.
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.lost.cancelled()
    }

    /// A token cancelled when the lease is lost (a child: cancelling it changes
    /// nothing here).
    pub fn cancellation(&self) -> CancellationToken {
        self.lost.child_token()
    }

    /// Stops renewing and deletes the key if it is still ours (a delete expecting the
    /// lease's last revision).
    pub async fn release(mut self) -> Released {
        self.stop.cancel();
        let last = match self.task.take() {
            Some(t) => t.await.ok().flatten(),
            None => None,
        };
        match last {
            Some(revision) => self.locks.delete(&self.key, revision).await,
            None => Released::Lost,
        }
    }
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_state_reads_puts_markers_and_foreign_values() {
        let rec = Record {
            holder: "a".into(),
            note: "n".into(),
            token: None,
        };
        let body = serde_json::to_vec(&rec).unwrap();
        // The acquiring write: its revision is the token.
        assert_eq!(
            KeyState::of(kv::Operation::Put, 7, &body),
            KeyState::Held {
                revision: 7,
                token: Token(7),
                record: rec.clone()
            }
        );
        // A renewal carries the token.
        let renewed = Record {
            token: Some(7),
            ..rec.clone()
        };
        let body = serde_json::to_vec(&renewed).unwrap();
        assert!(matches!(
            KeyState::of(kv::Operation::Put, 9, &body),
            KeyState::Held {
                revision: 9,
                token: Token(7),
                ..
            }
        ));
        assert_eq!(
            KeyState::of(kv::Operation::Purge, 11, b""),
            KeyState::Free { revision: 11 }
        );
        assert_eq!(
            KeyState::of(kv::Operation::Delete, 12, b""),
            KeyState::Free { revision: 12 }
        );
        // Garbage is held by nobody we know, until it expires.
        assert!(matches!(
            KeyState::of(kv::Operation::Put, 13, b"\xff"),
            KeyState::Held { token: Token(13), ref record, .. } if record.holder.is_empty()
        ));
    }
}
