//! The scheduler's configuration and its keys.

use std::collections::HashMap;
use std::time::Duration;

use protocol::keys::Keypair;
use protocol::wire::Mode;

use crate::{Error, Result};

/// How the scheduler behaves. Built once by `main` (or a test) and handed to [`crate::run`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Subject prefix (default `ts`).
    pub prefix: String,
    /// Mode of requests that name none and whose process has none.
    pub default_mode: Mode,
    /// Largest message body accepted (default 1 MiB). Capped by the server's `max_payload`.
    pub max_body: usize,
    /// How long a message id is remembered per process (default 10 minutes).
    pub dedupe_window: Duration,
    /// Most assignments in one run (one write).
    pub max_run_entries: usize,
    /// Most body bytes in one run (also capped by the server's `max_payload`).
    pub max_run_bytes: usize,
    /// Stream that `remote_confirmation` waits for (a mirror or source of the log).
    pub remote_stream: Option<String>,
    /// JetStream domain of `remote_stream`, if it lives in another domain.
    pub remote_domain: Option<String>,
    /// How long `remote_confirmation` waits before replying `remote_timeout`.
    pub remote_timeout: Duration,
    /// Replicas of the log stream and buckets when this scheduler creates them.
    pub replicas: usize,
    /// How long a write may keep failing before the waiting requests get `unavailable`.
    pub write_deadline: Duration,
    /// Runs written as pipelined single publishes at once; runs beyond go to the log
    /// as atomic batches (default 256; 16-32 suit `sync_interval: always`, where every
    /// single is an fsync).
    pub singles_in_flight: usize,
    /// Requests queued per process before new ones get `busy`.
    pub queue_per_process: usize,
    /// Bytes of requests (bodies and headers) admitted and not yet answered, in all;
    /// past it new requests get `busy` at once.
    pub max_queued_bytes: usize,
    /// The same, per process.
    pub max_queued_bytes_per_process: usize,
    /// A request that waited longer than this in its process's queue is answered
    /// `busy` instead of being scheduled: under sustained overload a client hears
    /// "retry" in bounded time rather than a receipt after its own timeout.
    pub max_queue_wait: Duration,
    /// An idle process actor stops after this long (its state is reloaded from the log).
    pub idle_actor: Duration,
    /// On SIGTERM, how long the replica goes on writing the requests it already took;
    /// then what it still holds is answered `unavailable` (never dropped).
    pub drain: Duration,
    /// How the startup steps (stream, buckets, keys, settings) retry transient failures,
    /// such as a cluster still electing leaders (default 100 ms doubling to 5 s, for up
    /// to 60 s).
    pub startup_backoff: journal::retry::Backoff,
    /// Head loads (head, dedupe window) and after-reconnect re-checks running at once on
    /// this replica; the other actors wait for a turn (ARCHITECTURE.md "Loads take turns").
    pub concurrent_loads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            prefix: "ts".into(),
            default_mode: Mode::LocalConfirmation,
            max_body: 1024 * 1024,
            dedupe_window: Duration::from_secs(600),
            max_run_entries: 1000,
            max_run_bytes: 512 * 1024,
            remote_stream: None,
            remote_domain: None,
            remote_timeout: Duration::from_secs(10),
            replicas: 1,
            write_deadline: Duration::from_secs(30),
            singles_in_flight: 256,
            queue_per_process: 65_536,
            max_queued_bytes: 512 * 1024 * 1024,
            max_queued_bytes_per_process: 64 * 1024 * 1024,
            max_queue_wait: Duration::from_secs(5),
            drain: Duration::from_secs(12),
            idle_actor: Duration::from_secs(600),
            startup_backoff: journal::retry::Backoff::default(),
            concurrent_loads: 8,
        }
    }
}

/// The keys a scheduler signs with: the first is the default; a process may require
/// several by id.
#[derive(Debug)]
pub struct Keyring {
    keys: Vec<Keypair>,
    by_id: HashMap<String, usize>,
}

impl Keyring {
    /// A keyring of `keys` (at least one).
    pub fn new(keys: Vec<Keypair>) -> Result<Keyring> {
        if keys.is_empty() {
            return Err(Error::Config(
                "at least one signing key is needed (turnstile keygen)".into(),
            ));
        }
        let by_id = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.id().to_string(), i))
            .collect();
        Ok(Keyring { keys, by_id })
    }

    /// Reads key files.
    pub fn from_files(paths: &[String]) -> Result<Keyring> {
        let mut keys = Vec::new();
        for p in paths {
            let text = std::fs::read_to_string(p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            keys.push(Keypair::from_key_file(&text)?);
        }
        Keyring::new(keys)
    }

    /// Every key.
    pub fn all(&self) -> Vec<&Keypair> {
        self.keys.iter().collect()
    }

    /// The keys that must sign a process's runs: the listed ids, or the default key.
    /// Errs with the first id this scheduler does not hold.
    pub fn select(&self, ids: &[String]) -> Result<Vec<&Keypair>, String> {
        if ids.is_empty() {
            return Ok(self.keys.first().into_iter().collect());
        }
        ids.iter()
            .map(|id| {
                self.by_id
                    .get(id)
                    .map(|&i| &self.keys[i])
                    .ok_or_else(|| id.clone())
            })
            .collect()
    }
}
