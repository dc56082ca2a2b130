//! Answers to clients. Every request gets exactly one: a receipt or a typed
//! refusal (the `Ts-Error` code plus the services API's error headers). Where the
//! answer may go is the service skeleton's business: never into our own space.

use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::warn;

use protocol::merkle::Tree;
use protocol::wire::{ErrorCode, Run};

pub use service::Refusal;

/// How a request was answered, told to whoever waits on it (a queue-key hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A receipt for `slot` (`duplicate`: the message id was already scheduled there).
    Assigned {
        /// The slot the receipt names.
        slot: u64,
        /// Whether it answered an earlier request with the same message id.
        duplicate: bool,
    },
    /// A refusal with this code.
    Refused(ErrorCode),
}

/// The reply handle of one request.
#[derive(Debug)]
pub struct Replier(
    service::Request,
    std::sync::Mutex<Option<oneshot::Sender<Answer>>>,
);

impl Replier {
    /// Wraps a request.
    pub fn new(req: service::Request) -> Replier {
        Replier(req, std::sync::Mutex::new(None))
    }

    /// The same handle, telling `tap` how the request was answered (the first answer
    /// only; a handle dropped unanswered drops `tap`).
    pub fn tapped(self, tap: oneshot::Sender<Answer>) -> Replier {
        Replier(self.0, std::sync::Mutex::new(Some(tap)))
    }

    fn tell(&self, answer: Answer) {
        if let Some(tap) = self.1.lock().ok().and_then(|mut t| t.take()) {
            let _ = tap.send(answer);
        }
    }

    /// The request's message.
    pub fn message(&self) -> &async_nats::Message {
        self.0.message()
    }

    /// Why the request could not be parsed, if it could not.
    pub fn malformed(&self) -> Option<&str> {
        self.0.malformed()
    }

    /// Answers with the receipt of entry `index` of `run`, whose tree is `tree`.
    pub async fn receipt(
        &self,
        run: &Run,
        tree: &Tree,
        index: usize,
        durable: bool,
        duplicate: bool,
    ) {
        match run
            .receipt_in(tree, index, durable, duplicate)
            .and_then(|r| r.encode())
        {
            Ok(bytes) => {
                self.ok(bytes.into()).await;
                self.tell(Answer::Assigned {
                    slot: run.first_slot + index as u64,
                    duplicate,
                });
            }
            Err(e) => {
                self.refuse(Refusal::new(
                    ErrorCode::Internal,
                    format!("cannot encode receipt: {e}"),
                ))
                .await
            }
        }
    }

    /// Answers with `payload`.
    pub async fn ok(&self, payload: Bytes) {
        if let Err(e) = self.0.respond(payload).await {
            warn!(error = %e, "could not send a reply");
        }
    }

    /// Answers with a typed refusal.
    pub async fn refuse(&self, r: Refusal) {
        self.tell(Answer::Refused(r.code));
        if r.code == ErrorCode::Internal || r.code == ErrorCode::Unavailable {
            warn!(code = r.code.as_str(), message = %r.message, "request failed");
        } else {
            tracing::debug!(code = r.code.as_str(), message = %r.message, "request refused");
        }
        if let Err(e) = self.0.refuse(&r).await {
            warn!(error = %e, "could not send a refusal");
        }
    }
}
