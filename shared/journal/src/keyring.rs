//! Publishing and fetching scheduler public keys (bucket `<PREFIX>_KEYS`).

use async_nats::jetstream::kv;
use futures::TryStreamExt;

use protocol::keys::Keypair;
use protocol::verify::TrustedKeys;
use protocol::wire::PublishedKey;

use crate::{Error, Result};

/// Publishes the public half of each key under its id. Idempotent.
pub async fn publish(store: &kv::Store, keys: &[&Keypair]) -> Result<()> {
    for k in keys {
        let record = PublishedKey {
            key_id: k.id().to_string(),
            public_key: k.public_key().to_vec(),
        };
        store
            .put(k.id(), record.encode()?.into())
            .await
            .map_err(|e| Error::nats("publish key", &e))?;
    }
    Ok(())
}

/// Every published key. A record that does not decode, or whose id is not the id of
/// its key, is skipped with a warning: it can never make a forgery verify.
pub async fn fetch(store: &kv::Store) -> Result<Vec<PublishedKey>> {
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| Error::nats("list keys", &e))?
        .try_collect()
        .await
        .map_err(|e| Error::nats("list keys", &e))?;
    let mut out = Vec::new();
    for id in keys {
        let Some(bytes) = store
            .get(&id)
            .await
            .map_err(|e| Error::nats("read key", &e))?
        else {
            continue;
        };
        match PublishedKey::decode(&bytes) {
            Ok(k) if trusted_form(&k).is_some() && k.key_id == id => out.push(k),
            _ => tracing::warn!(key_id = %id, "skipping a malformed published key"),
        }
    }
    Ok(out)
}

fn trusted_form(k: &PublishedKey) -> Option<[u8; 32]> {
    let pk: [u8; 32] = k.public_key.as_slice().try_into().ok()?;
    (protocol::keys::key_id(&pk) == k.key_id).then_some(pk)
}

/// The published keys as a verifier's trust set.
pub fn trust(keys: &[PublishedKey]) -> TrustedKeys {
    let mut t = TrustedKeys::default();
    for k in keys {
        if let Some(pk) = trusted_form(k) {
            t.insert(pk);
        }
    }
    t
}
