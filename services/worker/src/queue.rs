//! Queue keys, the worker's half (ARCHITECTURE.md "Queue keys"): a job whose entry
//! carries `Ts-Queue-Key` and `Ts-Queue-Hold` frees its key's hold in the queue-keys
//! bucket when it leaves the not-yet-started state (it starts, or is recorded
//! cancelled, merged or already final without starting here) — by a delete that
//! expects the revision it read, and only if the hold is this job's
//! ([`protocol::queue::may_release`]): a job delivered again after a newer request
//! took the key frees nothing.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tokio::sync::OnceCell;

use journal::subjects::{self, Subjects};
use protocol::queue::{hold_key, may_release, Hold};
use protocol::ProcessId;

use crate::job::Job;
use crate::{Error, Result};

/// Attempts at a release (a lost compare-and-set reads again; a NATS error waits).
const ATTEMPTS: usize = 5;

/// The instance's handle on the queue-keys bucket, opened at the first keyed job.
#[derive(Debug, Default)]
pub struct Holds {
    store: OnceCell<kv::Store>,
}

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The job carries no queue key.
    NoKey,
    /// The hold was this job's and is gone.
    Freed,
    /// No hold, or another request's: left alone.
    NotOurs,
}

impl Holds {
    async fn store(&self, js: &jetstream::Context, subjects: &Subjects) -> Result<&kv::Store> {
        self.store
            .get_or_try_init(|| async {
                js.get_key_value(subjects.queue_keys_bucket())
                    .await
                    .map_err(|e| Error::nats("open the queue-keys bucket", e))
            })
            .await
    }

    /// Frees `job`'s queue-key hold if it is still the job's.
    pub async fn release(
        &self,
        js: &jetstream::Context,
        subjects: &Subjects,
        job: &Job,
    ) -> Result<Released> {
        let (Some(key), Some(token)) = (
            job.header(subjects::QUEUE_KEY),
            job.header(subjects::QUEUE_HOLD),
        ) else {
            return Ok(Released::NoKey);
        };
        let token: u64 = token.parse().map_err(|_| {
            Error::MalformedJob(format!("{}: bad Ts-Queue-Hold {token:?}", job.id()))
        })?;
        let process =
            ProcessId::new(job.process.clone()).map_err(|e| Error::MalformedJob(e.to_string()))?;
        let name = hold_key(&process, key);
        let kv = self.store(js, subjects).await?;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let entry = match kv.entry(&name).await {
                Ok(e) => e,
                Err(e) => {
                    last = Some(Error::nats("read a queue-key hold", e));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Some(entry) = entry else {
                return Ok(Released::NotOurs);
            };
            if entry.operation != kv::Operation::Put {
                return Ok(Released::NotOurs);
            }
            let Ok(hold) = Hold::decode(&entry.value) else {
                return Ok(Released::NotOurs);
            };
            if !may_release(&hold, entry.revision, job.slot, token) {
                return Ok(Released::NotOurs);
            }
            match journal::setup::purge_released(kv, &name, Some(entry.revision)).await {
                Ok(()) => return Ok(Released::Freed),
                // Changed since we read it (the scheduler recorded the slot): read it
                // again; any other failure (the server away) waits a little first.
                Err(e) => {
                    if e.kind() != kv::UpdateErrorKind::WrongLastRevision {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    last = Some(Error::nats("release a queue-key hold", e));
                }
            }
        }
        Err(last.unwrap_or(Error::nats("release a queue-key hold", "gave up")))
    }
}
