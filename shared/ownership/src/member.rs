//! The membership: one driver task per member that watches the group's keys, decides
//! with [`plan::decide`], and writes the bucket. It never waits on NATS in its own
//! loop: every write runs in a task of its own and reports back, so a stalled server
//! delays nothing but that write, and each lease's local deadline is kept by a
//! watchdog task of its own (a lease is lost on time even if the driver is starved).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use journal::setup::OWNERSHIP_MARKER_TTL;
use journal::subjects::{self, OwnershipKey};

use crate::lease::{Lease, Token};
use crate::plan::{self, Action, KeyState, Local, View};
use crate::{Config, Error, Result};

/// The partitions a member holds, with their tokens. A partition given up is removed
/// at once, before it is released; one acquired is added once its create is
/// acknowledged. (A watch keeps the newest set only: a reader may miss a short-lived
/// one. The [`Lease`]s themselves are each delivered.)
pub type Held = BTreeMap<u32, Token>;

/// The value of a partition key (a wire type: other members read it).
#[derive(Debug, Serialize, Deserialize)]
struct PartitionRecord {
    /// The member holding the lease.
    holder: String,
    /// The lease's token; absent in the acquiring write, whose own revision it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<u64>,
}

/// The value of a member key (a wire type: other members read it).
#[derive(Debug, Serialize, Deserialize)]
struct MemberRecord {
    /// The member's partition count (all must agree).
    partitions: u32,
    /// The member's lease, in milliseconds.
    lease_ms: u64,
}

/// A member of a group. Dropping it is a crash as far as the group knows: its leases
/// end locally at once (every [`Lease::lost`] fires) but nothing is released, so its
/// partitions move only when the server expires them, one lease later. Call
/// [`Membership::leave`] to hand them over at once.
pub struct Membership {
    member: String,
    lease: Duration,
    held: watch::Receiver<Held>,
    leases: Option<mpsc::UnboundedReceiver<Lease>>,
    leave: Option<oneshot::Sender<()>>,
    driver: Option<JoinHandle<()>>,
}

impl Membership {
    /// Joins `config.group`: creates the bucket if needed (idempotent), announces the
    /// member and starts taking its share of the partitions.
    pub async fn join(js: jetstream::Context, config: Config) -> Result<Membership> {
        config.check()?;
        let options = journal::setup::LogOptions {
            replicas: config.replicas,
            ..Default::default()
        };
        let store = journal::setup::ensure_ownership(&js, &config.subjects, &options)
            .await
            .map_err(Error::Bucket)?;
        let mut stream = store.stream.clone();
        let info = stream.info().await.map_err(|e| Error::JetStream {
            op: "ownership bucket info",
            reason: e.to_string(),
        })?;
        let c = &info.config;
        if !c.allow_message_ttl
            || c.subject_delete_marker_ttl.is_none()
            || c.max_messages_per_subject != 1
        {
            return Err(Error::BucketConfig(store.name.clone()));
        }
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (held_tx, held) = watch::channel(Held::new());
        let (leases_tx, leases) = mpsc::unbounded_channel();
        let mut driver = Driver {
            writer: Writer {
                js,
                store,
                group: config.group.clone(),
                member: config.member.clone(),
                ttl: ttl_secs(config.lease),
                timeout: config.lease / 3,
            },
            partitions: config.partitions,
            lease: config.lease,
            view: View::default(),
            watch: None,
            watch_started: None,
            watch_pending: false,
            synced: false,
            slots: BTreeMap::new(),
            acquiring: BTreeSet::new(),
            attempted: BTreeMap::new(),
            probing: BTreeMap::new(),
            orphans: BTreeSet::new(),
            member_busy: false,
            leaving: false,
            member_gone: false,
            warned: BTreeSet::new(),
            held_tx,
            leases_tx,
            out_tx,
            out_rx,
            tasks: JoinSet::new(),
        };
        // Announce first, then watch (the newest message of every key, then every
        // change: `watch_with_history`; plain `watch` sends changes only): the first
        // snapshot holds at least our own key, so it ends with an entry marked current.
        let put = driver.writer.member_record(config.partitions, config.lease);
        match driver.writer.put_member(put).await {
            Write::Done(_) => {}
            Write::Refused => {
                return Err(Error::JetStream {
                    op: "announce member",
                    reason: "refused".into(),
                })
            }
            Write::Unknown(reason) => {
                return Err(Error::JetStream {
                    op: "announce member",
                    reason,
                })
            }
        }
        let watch = driver
            .writer
            .store
            .watch_with_history(subjects::ownership_group_keys(&config.group))
            .await
            .map_err(|e| Error::JetStream {
                op: "watch ownership keys",
                reason: e.to_string(),
            })?;
        driver.watch = Some(watch);
        driver.watch_started = Some(Instant::now());
        let (leave_tx, leave_rx) = oneshot::channel();
        let handle = tokio::spawn(driver.run(leave_rx));
        Ok(Membership {
            member: config.member,
            lease: config.lease,
            held,
            leases: Some(leases),
            leave: Some(leave_tx),
            driver: Some(handle),
        })
    }

    /// This member's id.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// The partitions held now, and every change to them.
    pub fn held(&self) -> watch::Receiver<Held> {
        self.held.clone()
    }

    /// The next lease acquired (in the order acquired). `None` once the membership
    /// has stopped. A lease left unread here is released only after one lease period
    /// when it is given up, so read them.
    pub async fn next_lease(&mut self) -> Option<Lease> {
        match &mut self.leases {
            Some(leases) => leases.recv().await,
            None => None,
        }
    }

    /// Takes the channel of acquired leases, for a task of the user's own that
    /// starts the work of each (then [`Membership::next_lease`] has nothing).
    pub fn leases(&mut self) -> Option<mpsc::UnboundedReceiver<Lease>> {
        self.leases.take()
    }

    /// Leaves the group gracefully: deletes the member key (the others rebalance at
    /// once), tells every lease to stop, releases each partition as soon as its work
    /// has stopped (every clone of its [`Lease`] dropped), and returns when all is
    /// released; within two lease periods, or [`Error::LeaveTimeout`] (what was not
    /// released then expires on the server).
    pub async fn leave(mut self) -> Result<()> {
        // Leases never taken from the channel have no work to wait for.
        if let Some(leases) = &mut self.leases {
            leases.close();
            while leases.try_recv().is_ok() {}
        }
        let Some(driver) = self.driver.take() else {
            return Err(Error::Stopped);
        };
        if let Some(tx) = self.leave.take() {
            let _ = tx.send(());
        }
        let bound = self.lease * 2 + Duration::from_secs(1);
        let abort = driver.abort_handle();
        match tokio::time::timeout(bound, driver).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => {
                abort.abort();
                Err(Error::LeaveTimeout(bound))
            }
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.take() {
            driver.abort();
        }
    }
}

/// The server's TTL for a lease: whole seconds, rounded up (never shorter than the
/// lease the holder counts with).
pub(crate) fn ttl_secs(lease: Duration) -> u64 {
    let s = lease.as_secs();
    if lease.subsec_nanos() > 0 { s + 1 } else { s }.max(1)
}

/// The outcome of a conditional write.
#[derive(Debug)]
pub(crate) enum Write {
    /// Stored at this revision.
    Done(u64),
    /// The expectation failed: the key is not as we thought.
    Refused,
    /// No answer or another error: it may or may not have been stored.
    Unknown(String),
}

/// The result of a renewal.
#[derive(Debug)]
enum Renewal {
    /// Renewed: the new revision; the deadline moves.
    Extended(u64),
    /// A renewal of ours whose answer was lost had landed: the key's newest revision
    /// is ours (the deadline stays: we do not know when it landed).
    Adopted(u64),
    /// Someone else's write, or the expiry marker, is after ours.
    Refused,
    /// Unknown; tried again at the next tick.
    Unknown(String),
}

/// What a task reports back to the driver.
enum Outcome {
    Acquired {
        partition: u32,
        expect: u64,
        sent: Instant,
        result: Write,
    },
    Renewed {
        partition: u32,
        token: u64,
        sent: Instant,
        result: Renewal,
    },
    /// The user's work on a given-up lease stopped (or the bound passed).
    Stopped {
        partition: u32,
        token: u64,
    },
    /// The local deadline passed without a renewal.
    Expired {
        partition: u32,
        token: u64,
    },
    /// A release's delete finished (whatever its result).
    Released {
        partition: u32,
        token: u64,
    },
    /// A key read again (`None`: it has no message).
    Observed {
        partition: u32,
        state: Option<KeyState>,
    },
    /// A key could not be read.
    ProbeFailed {
        partition: u32,
    },
    OrphanDeleted {
        partition: u32,
    },
    MemberWritten,
    MemberLeft,
    Watch(Option<Box<kv::Watch>>),
}

/// The bucket writes of one member.
#[derive(Clone)]
pub(crate) struct Writer {
    js: jetstream::Context,
    store: kv::Store,
    group: String,
    member: String,
    /// The lease's TTL in whole seconds.
    ttl: u64,
    /// How long one write may take before its outcome counts as unknown.
    timeout: Duration,
}

/// The subject of `key` in `store`'s bucket (the store's own prefix, as its `put`
/// does).
pub(crate) fn key_subject(store: &kv::Store, key: &str) -> String {
    let prefix = store.put_prefix.as_ref().unwrap_or(&store.prefix);
    format!("{prefix}{key}")
}

/// One write of `key` in `store`'s bucket with `headers` (expectation, TTL, marker):
/// done at its sequence, refused by its expectation, or of unknown fate (an error, or
/// no acknowledgement within `timeout`).
pub(crate) async fn write_key(
    js: &jetstream::Context,
    store: &kv::Store,
    key: &str,
    headers: HeaderMap,
    payload: Bytes,
    timeout: Duration,
) -> Write {
    let attempt = async {
        let ack = js
            .publish_with_headers(key_subject(store, key), headers, payload)
            .await?;
        ack.await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Err(_) => Write::Unknown("timed out".into()),
        Ok(Ok(ack)) => Write::Done(ack.sequence),
        Ok(Err(e)) if is_conflict(&e) => Write::Refused,
        Ok(Err(e)) => Write::Unknown(e.to_string()),
    }
}

impl Writer {
    fn member_record(&self, partitions: u32, lease: Duration) -> Bytes {
        let record = MemberRecord {
            partitions,
            lease_ms: lease.as_millis() as u64,
        };
        Bytes::from(serde_json::to_vec(&record).unwrap_or_default())
    }

    async fn publish(&self, key: &str, headers: HeaderMap, payload: Bytes) -> Write {
        write_key(&self.js, &self.store, key, headers, payload, self.timeout).await
    }

    pub(crate) fn headers(expect: Option<u64>, ttl: u64, delete: bool) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(expect) = expect {
            h.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                expect.to_string().as_str(),
            );
        }
        h.insert(
            async_nats::header::NATS_MESSAGE_TTL,
            ttl.to_string().as_str(),
        );
        if delete {
            h.insert(subjects::KV_OPERATION, subjects::KV_DELETE);
        }
        h
    }

    /// Announces (or renews) the member: a put with the lease's TTL.
    async fn put_member(&self, record: Bytes) -> Write {
        let key = subjects::ownership_member_key(&self.group, &self.member);
        self.publish(&key, Self::headers(None, self.ttl, false), record)
            .await
    }

    /// Removes the member: a delete marker (which expires like the server's own).
    async fn delete_member(&self) -> Write {
        let key = subjects::ownership_member_key(&self.group, &self.member);
        let ttl = OWNERSHIP_MARKER_TTL.as_secs();
        self.publish(&key, Self::headers(None, ttl, true), Bytes::new())
            .await
    }

    fn partition_record(&self, token: Option<u64>) -> Bytes {
        let record = PartitionRecord {
            holder: self.member.clone(),
            token,
        };
        Bytes::from(serde_json::to_vec(&record).unwrap_or_default())
    }

    /// Creates partition `p`'s key, expecting its last revision to be `expect`.
    async fn acquire(&self, p: u32, expect: u64) -> Write {
        let key = subjects::ownership_partition_key(&self.group, p);
        let headers = Self::headers(Some(expect), self.ttl, false);
        self.publish(&key, headers, self.partition_record(None))
            .await
    }

    /// Renews partition `p`'s lease `token`, last written at `revision`.
    async fn renew(&self, p: u32, token: u64, revision: u64) -> Renewal {
        let key = subjects::ownership_partition_key(&self.group, p);
        let headers = Self::headers(Some(revision), self.ttl, false);
        match self
            .publish(&key, headers, self.partition_record(Some(token)))
            .await
        {
            Write::Done(r) => Renewal::Extended(r),
            Write::Unknown(reason) => Renewal::Unknown(reason),
            Write::Refused => match self.read(p).await {
                // A renewal of ours whose answer was lost may have landed after all.
                Ok(Some(KeyState::Held {
                    holder,
                    revision: r,
                    token: t,
                })) if holder == self.member && t == token && r > revision => Renewal::Adopted(r),
                Ok(_) => Renewal::Refused,
                Err(reason) => Renewal::Unknown(reason),
            },
        }
    }

    /// Deletes partition `p`'s key, expecting our `revision` to be its last.
    async fn delete(&self, p: u32, revision: u64) -> Write {
        let key = subjects::ownership_partition_key(&self.group, p);
        let ttl = OWNERSHIP_MARKER_TTL.as_secs();
        self.publish(&key, Self::headers(Some(revision), ttl, true), Bytes::new())
            .await
    }

    /// Partition `p`'s key as stored now (`None`: no message at all).
    async fn read(&self, p: u32) -> std::result::Result<Option<KeyState>, String> {
        let key = subjects::ownership_partition_key(&self.group, p);
        let entry = tokio::time::timeout(self.timeout, self.store.entry(key))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(entry.map(|e| key_state(e.operation, e.revision, &e.value)))
    }
}

/// A partition key's state from one of its messages.
fn key_state(operation: kv::Operation, revision: u64, value: &[u8]) -> KeyState {
    match operation {
        kv::Operation::Put => match serde_json::from_slice::<PartitionRecord>(value) {
            Ok(r) => KeyState::Held {
                holder: r.holder,
                revision,
                token: r.token.unwrap_or(revision),
            },
            // Not ours to read: treat it as held by nobody live; it is probed until it
            // expires.
            Err(_) => KeyState::Held {
                holder: String::new(),
                revision,
                token: revision,
            },
        },
        kv::Operation::Delete | kv::Operation::Purge => KeyState::Free { revision },
    }
}

/// Whether a refused publish means "the expectation failed": 10071, or 10164 on a
/// replicated stream with a conflicting write in flight (ANCHORS.md: async-nats reports
/// that one as `Other`, so read the code).
pub(crate) fn is_conflict(e: &jetstream::context::PublishError) -> bool {
    use std::error::Error as _;
    if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence {
        return true;
    }
    let code = e
        .source()
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .map(|j| j.error_code().0);
    matches!(code, Some(10071) | Some(10164))
}

/// Where a lease of ours is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Held; `revoked`: the user was told to stop (a rebalance or leave), the key is
    /// still renewed until the work has stopped, then released.
    Held { revoked: bool },
    /// Lost (`release`: by our own deadline, so the key may still be ours: delete it
    /// once stopped) or overtaken (nothing to release).
    Stopping { release: bool },
    /// The delete is in flight.
    Releasing,
}

/// One lease of ours, as the driver keeps it.
struct Slot {
    token: u64,
    /// Our newest revision of the key.
    revision: u64,
    phase: Phase,
    /// A write (renewal, delete) in flight: one at a time per partition.
    busy: bool,
    /// The user's work has stopped (every clone of the lease dropped, or the bound).
    work_stopped: bool,
    lost: CancellationToken,
    deadline: watch::Sender<Instant>,
    /// Fires when every clone of the lease is dropped (taken by the waiter task).
    stopped: Option<oneshot::Receiver<()>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // However the driver ends (even aborted: a crash), no lease outlives it.
        self.lost.cancel();
    }
}

struct Driver {
    writer: Writer,
    partitions: u32,
    lease: Duration,
    view: View,
    watch: Option<kv::Watch>,
    watch_started: Option<Instant>,
    watch_pending: bool,
    /// The view is complete (the watch's snapshot has been read): decisions may be made.
    synced: bool,
    slots: BTreeMap<u32, Slot>,
    acquiring: BTreeSet<u32>,
    /// Creates refused since the last tick, by expected revision: not tried again
    /// with the same expectation until the view changes or a tick passes.
    attempted: BTreeMap<u32, u64>,
    /// Keys being read again, and when.
    probing: BTreeMap<u32, (Instant, bool)>,
    orphans: BTreeSet<u32>,
    member_busy: bool,
    leaving: bool,
    member_gone: bool,
    warned: BTreeSet<String>,
    held_tx: watch::Sender<Held>,
    leases_tx: mpsc::UnboundedSender<Lease>,
    out_tx: mpsc::UnboundedSender<Outcome>,
    out_rx: mpsc::UnboundedReceiver<Outcome>,
    /// Every task the driver started; aborted with it.
    tasks: JoinSet<()>,
}

/// The next entry of the watch, or never when there is none.
async fn next_entry(
    watch: &mut Option<kv::Watch>,
) -> Option<std::result::Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

impl Driver {
    /// The margin by which a holder gives a lease up before the server would expire it.
    fn margin(&self) -> Duration {
        self.lease / 5
    }

    async fn run(mut self, mut leave: oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(self.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut leave, if !self.leaving => self.start_leaving(),
                _ = tick.tick() => self.on_tick(),
                entry = next_entry(&mut self.watch) => self.on_entry(entry),
                Some(outcome) = self.out_rx.recv() => self.on_outcome(outcome),
                Some(_) = self.tasks.join_next() => {}
            }
            if self.leaving
                && self.member_gone
                && self.slots.is_empty()
                && self.acquiring.is_empty()
                && self.orphans.is_empty()
            {
                return;
            }
            if self.synced {
                self.act();
            }
            self.publish_held();
        }
    }

    fn spawn<F>(&mut self, work: F)
    where
        F: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let out = self.out_tx.clone();
        self.tasks.spawn(async move {
            let _ = out.send(work.await);
        });
    }

    fn start_leaving(&mut self) {
        self.leaving = true;
        let w = self.writer.clone();
        self.spawn(async move {
            if let Write::Unknown(reason) = w.delete_member().await {
                tracing::warn!(%reason, "member key not deleted; it expires on its own");
            }
            Outcome::MemberLeft
        });
    }

    fn on_tick(&mut self) {
        self.attempted.clear();
        if !self.leaving && !self.member_busy {
            self.member_busy = true;
            let w = self.writer.clone();
            let record = w.member_record(self.partitions, self.lease);
            self.spawn(async move {
                if let Write::Unknown(reason) = w.put_member(record).await {
                    tracing::debug!(%reason, "member key not renewed");
                }
                Outcome::MemberWritten
            });
        }
        let due: Vec<(u32, u64, u64)> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s.phase, Phase::Held { .. }) && !s.busy)
            .map(|(p, s)| (*p, s.token, s.revision))
            .collect();
        for (p, token, revision) in due {
            if let Some(s) = self.slots.get_mut(&p) {
                s.busy = true;
            }
            let w = self.writer.clone();
            self.spawn(async move {
                let sent = Instant::now();
                let result = w.renew(p, token, revision).await;
                Outcome::Renewed {
                    partition: p,
                    token,
                    sent,
                    result,
                }
            });
        }
        if self.watch.is_none() && !self.watch_pending {
            self.watch_pending = true;
            let w = self.writer.clone();
            let keys = subjects::ownership_group_keys(&w.group);
            self.spawn(async move {
                let watch = tokio::time::timeout(w.timeout, w.store.watch_with_history(keys)).await;
                Outcome::Watch(watch.ok().and_then(|r| r.ok()).map(Box::new))
            });
        }
        // The snapshot of a watch is complete once an entry says so; an empty one
        // never does, so a tick's time after the watch began counts as complete too.
        if let Some(started) = self.watch_started {
            if !self.synced && started.elapsed() >= self.lease / 3 {
                self.synced = true;
            }
        }
    }

    fn on_entry(&mut self, entry: Option<std::result::Result<kv::Entry, kv::WatcherError>>) {
        let entry = match entry {
            Some(Ok(entry)) => entry,
            other => {
                let reason = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "ended".into(),
                };
                tracing::warn!(%reason, "ownership watch lost; watching again");
                self.watch = None;
                self.watch_started = None;
                self.synced = false;
                self.view = View::default();
                return;
            }
        };
        match subjects::parse_ownership_key(&self.writer.group, &entry.key) {
            Some(OwnershipKey::Member(m)) => {
                if entry.operation == kv::Operation::Put {
                    self.check_member(&m, &entry.value);
                    self.view.members.insert(m);
                } else {
                    self.view.members.remove(&m);
                }
            }
            Some(OwnershipKey::Partition(p)) if p < self.partitions => {
                let state = key_state(entry.operation, entry.revision, &entry.value);
                self.view.observe(p, state);
            }
            _ => {}
        }
        if entry.seen_current {
            self.synced = true;
        }
    }

    /// Warns once about a member whose partition count differs: the two would never
    /// agree on an assignment (safe, since the bucket arbitrates, but never settled).
    fn check_member(&mut self, member: &str, value: &[u8]) {
        if let Ok(r) = serde_json::from_slice::<MemberRecord>(value) {
            if r.partitions != self.partitions && self.warned.insert(member.to_string()) {
                tracing::warn!(
                    group = %self.writer.group,
                    member,
                    theirs = r.partitions,
                    ours = self.partitions,
                    "a member of the group uses another partition count"
                );
            }
        }
    }

    fn on_outcome(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Acquired {
                partition,
                expect,
                sent,
                result,
            } => {
                self.acquiring.remove(&partition);
                match result {
                    Write::Done(token) => self.hold(partition, token, sent),
                    Write::Refused => {
                        self.attempted.insert(partition, expect);
                        self.probe(partition);
                    }
                    // If it landed, the watch shows our key and we delete it.
                    Write::Unknown(reason) => {
                        tracing::debug!(partition, %reason, "acquire unanswered")
                    }
                }
            }
            Outcome::Renewed {
                partition,
                token,
                sent,
                result,
            } => {
                let deadline = sent + self.lease - self.margin();
                let Some(s) = self.slots.get_mut(&partition).filter(|s| s.token == token) else {
                    return;
                };
                s.busy = false;
                match result {
                    Renewal::Extended(r) => {
                        s.revision = r;
                        if !s.lost.is_cancelled() {
                            s.deadline.send_if_modified(|d| {
                                let later = deadline > *d;
                                if later {
                                    *d = deadline;
                                }
                                later
                            });
                        }
                    }
                    Renewal::Adopted(r) => s.revision = r,
                    Renewal::Refused => {
                        tracing::warn!(partition, token, "renewal refused: lease lost");
                        self.lose(partition, false);
                    }
                    Renewal::Unknown(reason) => {
                        tracing::debug!(partition, %reason, "renewal unanswered")
                    }
                }
                self.advance(partition);
            }
            Outcome::Stopped { partition, token } => {
                if let Some(s) = self.slots.get_mut(&partition).filter(|s| s.token == token) {
                    s.work_stopped = true;
                    self.advance(partition);
                }
            }
            Outcome::Expired { partition, token } => {
                let held = self
                    .slots
                    .get(&partition)
                    .is_some_and(|s| s.token == token && matches!(s.phase, Phase::Held { .. }));
                if held {
                    tracing::warn!(partition, token, "lease not renewed in time: given up");
                    self.lose(partition, true);
                }
            }
            Outcome::Released { partition, token } => {
                if self.slots.get(&partition).is_some_and(|s| s.token == token) {
                    self.slots.remove(&partition);
                }
            }
            Outcome::Observed { partition, state } => {
                if let Some((_, in_flight)) = self.probing.get_mut(&partition) {
                    *in_flight = false;
                }
                self.view
                    .observe(partition, state.unwrap_or(KeyState::Free { revision: 0 }));
            }
            Outcome::ProbeFailed { partition } => {
                if let Some((_, in_flight)) = self.probing.get_mut(&partition) {
                    *in_flight = false;
                }
            }
            Outcome::OrphanDeleted { partition } => {
                self.orphans.remove(&partition);
            }
            Outcome::MemberWritten => self.member_busy = false,
            Outcome::MemberLeft => self.member_gone = true,
            Outcome::Watch(watch) => {
                self.watch_pending = false;
                if let Some(watch) = watch {
                    self.view = View::default();
                    self.synced = false;
                    self.watch = Some(*watch);
                    self.watch_started = Some(Instant::now());
                }
            }
        }
    }

    /// Carries out what [`plan::decide`] says.
    fn act(&mut self) {
        let local = self.local();
        let actions = plan::decide(
            &self.writer.group,
            &self.writer.member,
            self.partitions,
            &self.view,
            &local,
            self.leaving,
        );
        for action in actions {
            match action {
                Action::Acquire { partition, expect } => {
                    if self.attempted.get(&partition) == Some(&expect) {
                        continue;
                    }
                    self.acquiring.insert(partition);
                    let w = self.writer.clone();
                    self.spawn(async move {
                        let sent = Instant::now();
                        let result = w.acquire(partition, expect).await;
                        Outcome::Acquired {
                            partition,
                            expect,
                            sent,
                            result,
                        }
                    });
                }
                Action::Revoke { partition } => self.revoke(partition),
                Action::Lost { partition } => {
                    tracing::warn!(partition, "lease overtaken in the bucket");
                    self.lose(partition, false)
                }
                Action::DeleteOrphan {
                    partition,
                    revision,
                } => {
                    self.orphans.insert(partition);
                    let w = self.writer.clone();
                    self.spawn(async move {
                        let _ = w.delete(partition, revision).await;
                        Outcome::OrphanDeleted { partition }
                    });
                }
                Action::Probe { partition } => self.probe(partition),
            }
        }
    }

    /// Reads partition `p`'s key again, at most once per lease/3.
    fn probe(&mut self, p: u32) {
        let now = Instant::now();
        if let Some((at, in_flight)) = self.probing.get(&p) {
            if *in_flight || now.duration_since(*at) < self.lease / 3 {
                return;
            }
        }
        self.probing.insert(p, (now, true));
        let w = self.writer.clone();
        self.spawn(async move {
            match w.read(p).await {
                Ok(state) => Outcome::Observed {
                    partition: p,
                    state,
                },
                // Nothing learnt; the next probe may do better.
                Err(_) => Outcome::ProbeFailed { partition: p },
            }
        });
    }

    /// What this member is doing, as [`plan::decide`] reads it.
    fn local(&self) -> BTreeMap<u32, Local> {
        let mut local = BTreeMap::new();
        for &p in &self.acquiring {
            local.insert(p, Local::Acquiring);
        }
        for &p in &self.orphans {
            local.insert(p, Local::Stopping);
        }
        for (&p, s) in &self.slots {
            let l = match s.phase {
                Phase::Held { revoked } => Local::Held {
                    token: s.token,
                    revision: s.revision,
                    revoked,
                },
                Phase::Stopping { .. } | Phase::Releasing => Local::Stopping,
            };
            local.insert(p, l);
        }
        local
    }

    /// A create succeeded at revision `token`: hand the lease to the user.
    fn hold(&mut self, p: u32, token: u64, sent: Instant) {
        let lost = CancellationToken::new();
        let (deadline_tx, deadline_rx) = watch::channel(sent + self.lease - self.margin());
        let (stopped_tx, stopped_rx) = oneshot::channel();
        let lease = Lease::new(
            p,
            Token(token),
            lost.clone(),
            deadline_rx.clone(),
            stopped_tx,
        );
        self.slots.insert(
            p,
            Slot {
                token,
                revision: token,
                phase: Phase::Held { revoked: false },
                busy: false,
                work_stopped: false,
                lost: lost.clone(),
                deadline: deadline_tx,
                stopped: Some(stopped_rx),
            },
        );
        let out = self.out_tx.clone();
        self.tasks.spawn(watchdog(p, token, lost, deadline_rx, out));
        tracing::debug!(partition = p, token, "lease acquired");
        let _ = self.leases_tx.send(lease);
    }

    /// Tells the user to stop; the key is released once the work has stopped.
    fn revoke(&mut self, p: u32) {
        let Some(s) = self.slots.get_mut(&p) else {
            return;
        };
        if s.phase != (Phase::Held { revoked: false }) {
            return;
        }
        s.phase = Phase::Held { revoked: true };
        s.lost.cancel();
        tracing::debug!(partition = p, token = s.token, "lease given up (rebalance)");
        self.wait_for_work(p);
    }

    /// The lease is gone: tell the user; `release`: delete the key once stopped.
    fn lose(&mut self, p: u32, release: bool) {
        let Some(s) = self.slots.get_mut(&p) else {
            return;
        };
        if matches!(s.phase, Phase::Releasing | Phase::Stopping { .. }) {
            return;
        }
        s.phase = Phase::Stopping { release };
        s.lost.cancel();
        self.wait_for_work(p);
        self.advance(p);
    }

    /// Starts waiting (at most one lease period) for the user's work on `p` to stop.
    fn wait_for_work(&mut self, p: u32) {
        let bound = self.lease;
        let Some(s) = self.slots.get_mut(&p) else {
            return;
        };
        let Some(stopped) = s.stopped.take() else {
            return;
        };
        let token = s.token;
        self.spawn(async move {
            let _ = tokio::time::timeout(bound, stopped).await;
            Outcome::Stopped {
                partition: p,
                token,
            }
        });
    }

    /// Moves a given-up lease on once its work has stopped and no write is in flight.
    fn advance(&mut self, p: u32) {
        let Some(s) = self.slots.get_mut(&p) else {
            return;
        };
        if s.busy || !s.work_stopped {
            return;
        }
        match s.phase {
            Phase::Held { revoked: true } | Phase::Stopping { release: true } => {
                s.phase = Phase::Releasing;
                s.busy = true;
                let (token, revision) = (s.token, s.revision);
                let w = self.writer.clone();
                self.spawn(async move {
                    if let Write::Unknown(reason) = w.delete(p, revision).await {
                        tracing::debug!(partition = p, %reason, "release unanswered; the key expires on its own");
                    }
                    Outcome::Released {
                        partition: p,
                        token,
                    }
                });
            }
            Phase::Stopping { release: false } => {
                self.slots.remove(&p);
            }
            Phase::Held { revoked: false } | Phase::Releasing => {}
        }
    }

    /// Publishes the held set if it changed.
    fn publish_held(&mut self) {
        let now: Held = self
            .slots
            .iter()
            .filter(|(_, s)| s.phase == Phase::Held { revoked: false } && !s.lost.is_cancelled())
            .map(|(p, s)| (*p, Token(s.token)))
            .collect();
        self.held_tx.send_if_modified(|held| {
            let changed = *held != now;
            if changed {
                *held = now;
            }
            changed
        });
    }
}

/// Gives the lease up at its local deadline unless a renewal moves the deadline first.
async fn watchdog(
    partition: u32,
    token: u64,
    lost: CancellationToken,
    mut deadline: watch::Receiver<Instant>,
    out: mpsc::UnboundedSender<Outcome>,
) {
    loop {
        let at = *deadline.borrow_and_update();
        tokio::select! {
            _ = lost.cancelled() => return,
            changed = deadline.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(at) => {
                if *deadline.borrow() <= Instant::now() {
                    lost.cancel();
                    let _ = out.send(Outcome::Expired { partition, token });
                    return;
                }
            }
        }
    }
}
