//! The signer: one task that seals the runs of every process in batches, so one
//! ed25519 signature per key covers all runs written at about the same time (see
//! `protocol::seal`). Requests queue while a batch is being signed, so batches grow
//! with load by themselves and a lone run is signed at once.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use protocol::hash::Hash32;
use protocol::seal::{self, Seal};

use crate::config::Keyring;

/// Most runs sealed by one signature.
const MAX_BATCH: usize = 4096;

struct Request {
    keys: Vec<String>,
    digest: Hash32,
    reply: oneshot::Sender<Result<Seal, String>>,
}

/// A handle to the signer task.
#[derive(Clone)]
pub(crate) struct Signer {
    tx: mpsc::UnboundedSender<Request>,
}

impl Signer {
    /// Starts the signer; it stops when every handle is dropped (the last one goes
    /// with the scheduler's shared state, after every actor has finished).
    pub fn start(keyring: Arc<Keyring>) -> Signer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(keyring, rx));
        Signer { tx }
    }

    /// Seals the run whose statement digest is `digest` with the keys named by `keys`
    /// (empty: the default key). Errs with the first key id the keyring lacks.
    pub async fn seal(&self, keys: Vec<String>, digest: Hash32) -> Result<Seal, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request {
                keys,
                digest,
                reply,
            })
            .map_err(|_| "signer stopped".to_string())?;
        rx.await.map_err(|_| "signer stopped".to_string())?
    }
}

async fn run(keyring: Arc<Keyring>, mut rx: mpsc::UnboundedReceiver<Request>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut groups: HashMap<Vec<String>, Vec<Request>> = HashMap::new();
        for r in batch {
            groups.entry(r.keys.clone()).or_default().push(r);
        }
        for (ids, requests) in groups {
            match keyring.select(&ids) {
                Ok(keys) => {
                    let digests: Vec<Hash32> = requests.iter().map(|r| r.digest).collect();
                    for (r, s) in requests.into_iter().zip(seal::seal(&digests, &keys)) {
                        let _ = r.reply.send(Ok(s));
                    }
                }
                Err(missing) => {
                    for r in requests {
                        let _ = r.reply.send(Err(missing.clone()));
                    }
                }
            }
        }
        tokio::task::yield_now().await;
    }
}
