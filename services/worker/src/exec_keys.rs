//! Execution keys (Roger's global state): jobs whose messages carry the same
//! `Ts-Execution-Key` header never run at the same time anywhere in the cluster; a
//! waiting one runs as soon as the key frees.
//!
//! A key is a lease in the bucket `<PREFIX>_EXEC_KEYS` (`ownership::keyed`): before an
//! attempt starts, its instance creates the key's entry (`x<hash of the key>`; value:
//! the instance, and the job in the note). Created: the attempt runs, the lease is
//! renewed every lease/3 while it does, and released (a delete that expects the last
//! revision) when the handler returns. Refused (held elsewhere): the job is *parked* —
//! put back in the buffer, where it stays held and kept alive, and executors pass it
//! over — until this instance's watch of the bucket sees the key deleted or expired
//! (a marker), or a poll interval passes; then an executor tries again. A holder that
//! died stops renewing: the server expires its key one lease after its last renewal.
//! A renewal refused (the lease expired, e.g. the instance was stalled) or a local
//! deadline passed: the running attempt is cancelled and recorded failed.
//!
//! The fencing token (the revision of the acquiring write; every later holder of the
//! key has a greater one) is in the handler's [`crate::handler::Context`], so a handler
//! can fence its side effects. See ARCHITECTURE.md "Workers" for the choices.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use journal::subjects::{self, Subjects};
use ownership::keyed::{Acquire, KeyLease, KeyState, Locks, Released};

use crate::job::Job;
use crate::Result;

/// A job's execution key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// As the message carries it.
    pub key: String,
    /// Its entry in the bucket (`x` + hex of its hash).
    pub name: String,
}

/// The execution key of `job`: none, a valid one, or why it is not one (such a job
/// is never run: no lock could hold it).
pub fn key_of(job: &Job) -> Option<Result<Key, String>> {
    let key = job.header(subjects::EXECUTION_KEY)?;
    Some(if subjects::is_execution_key(key) {
        Ok(Key {
            key: key.to_string(),
            name: subjects::exec_key_name(key),
        })
    } else {
        Err(format!(
            "{} is not 1-{} bytes without control characters",
            subjects::EXECUTION_KEY,
            subjects::MAX_EXECUTION_KEY
        ))
    })
}

/// What an instance knows of the keys (pure): which its own attempts hold, which it
/// saw held elsewhere (and until when it takes that for granted before trying again).
#[derive(Debug, Default)]
pub struct Waits {
    held_here: HashSet<String>,
    busy: HashMap<String, Instant>,
}

impl Waits {
    /// Whether an attempt with the key `name` may try to take it now: no attempt of
    /// ours holds it, and it is not known held elsewhere (or that was a poll ago).
    pub fn may_try(&self, name: &str, now: Instant) -> bool {
        !self.held_here.contains(name) && self.busy.get(name).is_none_or(|until| now >= *until)
    }

    /// An attempt of ours took it.
    pub fn taken(&mut self, name: &str) {
        self.busy.remove(name);
        self.held_here.insert(name.to_string());
    }

    /// Our attempt let it go.
    pub fn released(&mut self, name: &str) {
        self.held_here.remove(name);
    }

    /// Seen held by someone else: not tried again before `now + poll` unless it is
    /// seen free first.
    pub fn busy(&mut self, name: &str, now: Instant, poll: Duration) {
        self.busy.insert(name.to_string(), now + poll);
    }

    /// Seen deleted or expired: whether anything here waited for it.
    pub fn freed(&mut self, name: &str) -> bool {
        self.busy.remove(name).is_some()
    }

    /// Forgets waits whose poll is long past (keys nothing here waits for any more).
    pub fn sweep(&mut self, now: Instant, older_than: Duration) {
        self.busy
            .retain(|_, until| now.saturating_duration_since(*until) < older_than);
    }
}

/// The fencing of one attempt: its key and the lease's token, as handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fencing {
    /// The execution key.
    pub key: String,
    /// Its entry in the bucket.
    pub name: String,
    /// The token: the revision of the write that took the key. Every later holder of
    /// the key has a greater one, so a resource that keeps the greatest token it saw
    /// and refuses smaller ones is safe from a holder whose lease lapsed.
    pub token: u64,
}

/// What trying to take a key came to.
pub enum Step {
    /// Taken: run, then [`Hold::release`].
    Held(Hold),
    /// Held elsewhere (by whom, for the record): park the job.
    Busy(String),
    /// Could not tell (NATS): park the job, tried again after a poll.
    Failed(String),
}

/// An instance's execution keys.
pub struct ExecKeys {
    locks: Locks,
    instance: String,
    poll: Duration,
    waits: Mutex<Waits>,
}

impl ExecKeys {
    /// Opens (creates if needed) the bucket for `instance`, with leases of `lease`.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        subjects: &Subjects,
        lease: Duration,
        replicas: usize,
        instance: &str,
    ) -> Result<Arc<ExecKeys>> {
        let options = journal::setup::LogOptions {
            replicas,
            ..Default::default()
        };
        let store = journal::setup::ensure_exec_keys(js, subjects, &options).await?;
        let locks = Locks::new(js.clone(), store, lease).await?;
        Ok(Arc::new(ExecKeys {
            locks,
            instance: instance.to_string(),
            poll: (lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(1)),
            waits: Mutex::new(Waits::default()),
        }))
    }

    /// The leases' bucket.
    pub fn locks(&self) -> &Locks {
        &self.locks
    }

    /// Whether a job with `key` may be started now (a job without one: yes; an
    /// invalid one: yes, to be recorded dead).
    pub fn may_start(&self, key: Option<&Result<Key, String>>) -> bool {
        match key {
            Some(Ok(k)) => self
                .waits
                .lock()
                .is_ok_and(|w| w.may_try(&k.name, Instant::now())),
            _ => true,
        }
    }

    /// Tries to take `key` for an attempt (`note`: the job, shown to others).
    pub async fn acquire(self: &Arc<Self>, key: &Key, note: &str) -> Step {
        // Claimed here first, so no other executor of ours tries it meanwhile.
        let claimed = self
            .waits
            .lock()
            .map(|mut w| {
                let ok = w.may_try(&key.name, Instant::now());
                if ok {
                    w.taken(&key.name);
                }
                ok
            })
            .unwrap_or(false);
        if !claimed {
            return Step::Busy("held by another job of this instance".into());
        }
        let r = self
            .locks
            .try_acquire(&key.name, &self.instance, note)
            .await;
        match r {
            Ok(Acquire::Held(lease)) => Step::Held(Hold {
                keys: Arc::clone(self),
                fencing: Fencing {
                    key: key.key.clone(),
                    name: key.name.clone(),
                    token: lease.token().get(),
                },
                lease: Some(lease),
            }),
            Ok(Acquire::Busy { token, record, .. }) => {
                self.set_busy(&key.name);
                Step::Busy(format!(
                    "held by {} ({}), token {token}",
                    record.holder, record.note
                ))
            }
            Err(e) => {
                self.set_busy(&key.name);
                Step::Failed(e.to_string())
            }
        }
    }

    fn set_busy(&self, name: &str) {
        if let Ok(mut w) = self.waits.lock() {
            w.released(name);
            w.busy(name, Instant::now(), self.poll);
        }
    }

    /// Follows every change of the bucket: a key deleted or expired frees what waits
    /// for it here (`freed` is called); a key taken elsewhere is marked busy. Runs
    /// until aborted (a failed watch is opened again after a second).
    pub async fn follow(self: Arc<Self>, freed: impl Fn() + Send + Sync) {
        let mut swept = Instant::now();
        loop {
            let mut watch = match self.locks.watch().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!("execution keys: {e}; watching again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { break };
                let now = Instant::now();
                match KeyState::of(entry.operation, entry.revision, &entry.value) {
                    KeyState::Free { revision } => {
                        self.locks.saw_free(&entry.key, revision);
                        let woke = self.waits.lock().is_ok_and(|mut w| w.freed(&entry.key));
                        if woke {
                            freed();
                        }
                    }
                    KeyState::Held { record, .. } if record.holder != self.instance => {
                        if let Ok(mut w) = self.waits.lock() {
                            w.busy(&entry.key, now, self.poll);
                        }
                    }
                    KeyState::Held { .. } => {}
                }
                if now.duration_since(swept) > Duration::from_secs(60) {
                    swept = now;
                    if let Ok(mut w) = self.waits.lock() {
                        w.sweep(now, Duration::from_secs(60));
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A key held by a running attempt.
pub struct Hold {
    keys: Arc<ExecKeys>,
    fencing: Fencing,
    lease: Option<KeyLease>,
}

impl Hold {
    /// The key and token, for the handler.
    pub fn fencing(&self) -> &Fencing {
        &self.fencing
    }

    /// Cancelled when the lease is lost (its attempt must stop).
    pub fn lost(&self) -> CancellationToken {
        match &self.lease {
            Some(l) => l.cancellation(),
            None => {
                let t = CancellationToken::new();
                t.cancel();
                t
            }
        }
    }

    /// Whether the lease still holds as far as this instance knows.
    pub fn is_current(&self) -> bool {
        self.lease.as_ref().is_some_and(KeyLease::is_current)
    }

    /// Lets the key go (a delete expecting the lease's last revision; a lost lease is
    /// left as it is). Whether the lease held to the end: false if it was lost before
    /// (renewal refused, local deadline passed, or the delete found it taken).
    pub async fn release(mut self) -> bool {
        let held = self.is_current();
        let released = match self.lease.take() {
            Some(lease) => lease.release().await,
            None => Released::Lost,
        };
        self.forget();
        held && released != Released::Lost
    }

    fn forget(&self) {
        if let Ok(mut w) = self.keys.waits.lock() {
            w.released(&self.fencing.name);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        // Not released (the attempt's task ended otherwise): the lease stops renewing
        // and expires on the server; nothing here holds it any more.
        if self.lease.is_some() {
            self.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_with(headers: &[(&str, &str)]) -> Job {
        Job {
            v: crate::job::JOB_VERSION,
            group: "g".into(),
            process: "p".into(),
            slot: 1,
            message_id: "m".into(),
            timestamp_ms: 0,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
            log_seq: 1,
            chain_hash: String::new(),
        }
    }

    #[test]
    fn a_job_s_key_is_read_case_blind_and_checked() {
        assert_eq!(key_of(&job_with(&[("x", "y")])), None);
        let k = key_of(&job_with(&[("ts-execution-key", "inv-1")]))
            .unwrap()
            .unwrap();
        assert_eq!(k.key, "inv-1");
        assert_eq!(k.name, subjects::exec_key_name("inv-1"));
        assert!(key_of(&job_with(&[("Ts-Execution-Key", "")]))
            .unwrap()
            .is_err());
        let long = "k".repeat(257);
        assert!(key_of(&job_with(&[("Ts-Execution-Key", &long)]))
            .unwrap()
            .is_err());
        assert!(key_of(&job_with(&[("Ts-Execution-Key", "a\tb")]))
            .unwrap()
            .is_err());
    }

    #[test]
    fn a_key_held_here_or_elsewhere_waits_until_freed_or_a_poll_passed() {
        let poll = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut w = Waits::default();
        assert!(w.may_try("a", t0));
        // Ours: no other attempt of ours tries it, whatever the time.
        w.taken("a");
        assert!(!w.may_try("a", t0 + Duration::from_secs(3600)));
        w.released("a");
        assert!(w.may_try("a", t0));
        // Elsewhere: not before the poll, unless seen freed.
        w.busy("a", t0, poll);
        assert!(!w.may_try("a", t0 + Duration::from_millis(999)));
        assert!(w.may_try("a", t0 + poll));
        assert!(w.freed("a"));
        assert!(w.may_try("a", t0));
        // A free nobody waited for wakes nobody.
        assert!(!w.freed("b"));
        // Other keys are independent.
        w.busy("a", t0, poll);
        assert!(w.may_try("b", t0));
    }

    #[test]
    fn old_waits_are_swept_and_recent_ones_kept() {
        let t0 = Instant::now();
        let mut w = Waits::default();
        w.busy("old", t0, Duration::ZERO);
        w.busy("new", t0 + Duration::from_secs(120), Duration::ZERO);
        w.sweep(t0 + Duration::from_secs(121), Duration::from_secs(60));
        assert!(!w.freed("old"));
        assert!(w.freed("new"));
    }
}
