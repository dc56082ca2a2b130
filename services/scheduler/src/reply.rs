//! Answers to clients. Every request gets exactly one: a receipt or a typed
//! refusal (the `Ts-Error` code plus the services API's error headers). Where the
//! answer may go is the service skeleton's business: never into our own space.

use bytes::Bytes;
use tracing::warn;

use protocol::merkle::Tree;
use protocol::wire::{ErrorCode, Run};

/// A refusal: a code and a message for the client.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The typed reason.
    pub code: ErrorCode,
    /// What to tell the client.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// The reply handle of one request.
#[derive(Debug)]
pub struct Replier(service::Request);

impl Replier {
    /// Wraps a request.
    pub fn new(req: service::Request) -> Replier {
        Replier(req)
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
            Ok(bytes) => self.ok(bytes.into()).await,
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
        if r.code == ErrorCode::Internal || r.code == ErrorCode::Unavailable {
            warn!(code = r.code.as_str(), message = %r.message, "request failed");
        } else {
            tracing::debug!(code = r.code.as_str(), message = %r.message, "request refused");
        }
        if let Err(e) = self
            .0
            .refuse(r.code.as_str(), r.code.status(), &r.message)
            .await
        {
            warn!(error = %e, "could not send a refusal");
        }
    }
}
