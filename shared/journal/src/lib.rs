//! turnstile's NATS side, shared by the services, the CLI and the tests.
//!
//! # Layout
//! - [`subjects`]: every subject, stream, bucket and header name (nowhere else
//!   formats one).
//! - [`setup`]: the server version check and idempotent stream/bucket creation.
//! - [`reader`]: reading the assignment log: head in O(1), slot lookup in
//!   O(log n) reads, ordered range scans and live tails.
//! - [`chain`]: a process's chain by the rule of schemas/chain.md: the verified head,
//!   judged messages (chain runs and foreign ones).
//! - [`audit`]: the verification driver (reads the log, feeds the pure verifier).
//! - [`client`]: the request/reply client of the scheduler (what the CLI uses).
//! - [`keyring`]: publishing and fetching scheduler public keys.
//! - [`url`]: credentials inside NATS URLs.
//! - [`retry`]: startup steps retried while a cluster forms; a misconfiguration ends
//!   them at once.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod audit;
pub mod chain;
pub mod client;
pub mod jserr;
pub mod keyring;
pub mod reader;
pub mod retry;
pub mod setup;
pub mod subjects;
pub mod url;

pub use protocol;

use protocol::wire::ErrorCode;

/// Everything that can go wrong talking to NATS about the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server is older than turnstile supports.
    #[error("nats-server {found} is too old: turnstile needs >= {required} (atomic expectations on replicated streams, see ANCHORS.md); run `make tools` or set NATS_SERVER_BIN")]
    ServerTooOld {
        /// The version the server reported.
        found: String,
        /// The minimum version.
        required: String,
    },
    /// The server has JetStream disabled.
    #[error("JetStream is not enabled on the server (start nats-server with -js)")]
    NoJetStream,
    /// A JetStream API call failed.
    #[error("jetstream {op}: {reason}")]
    JetStream {
        /// What was being done.
        op: &'static str,
        /// The server's or client's reason.
        reason: String,
    },
    /// A NATS call failed, with the kind of failure read from its error code or kind
    /// (the startup paths: setup, keys, settings).
    #[error("jetstream {op}: {reason}")]
    Nats {
        /// What was being done.
        op: &'static str,
        /// What kind of failure (transient or not).
        failure: retry::Failure,
        /// The server's or client's reason.
        reason: String,
    },
    /// A startup step still failed transiently when its time was up.
    #[error("{what}: still failing after {attempts} attempts in {elapsed:.1?}: {last}")]
    GaveUp {
        /// The step.
        what: &'static str,
        /// How many attempts were made.
        attempts: u32,
        /// How long they took.
        elapsed: std::time::Duration,
        /// The last attempt's error.
        last: Box<Error>,
    },
    /// The deployment contradicts what turnstile needs (an existing stream that cannot
    /// be the log, ...).
    #[error("misconfigured: {0}")]
    Misconfigured(String),
    /// Nobody answers on the subject (no scheduler running).
    #[error("no scheduler answers on {0}")]
    NoResponders(String),
    /// A request timed out.
    #[error("request on {0} timed out")]
    Timeout(String),
    /// The scheduler refused the request.
    #[error("refused ({code}): {message}", code = code.as_str())]
    Refused {
        /// The typed reason.
        code: ErrorCode,
        /// The human-readable message.
        message: String,
    },
    /// A stored record or reply is not what the protocol says.
    #[error("bad record at stream sequence {seq}: {reason}")]
    BadRecord {
        /// Stream sequence of the record (0 for a reply).
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A NATS URL that cannot be used.
    #[error("{0}")]
    BadUrl(String),
    /// A protocol-level error (invalid process id, decode failure, ...).
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
}

impl Error {
    /// A failed NATS call `op`, its kind of failure read from `error`.
    pub fn nats(op: &'static str, error: &(dyn std::error::Error + 'static)) -> Error {
        Error::Nats {
            op,
            failure: retry::Failure::of(error),
            reason: error.to_string(),
        }
    }

    /// Whether waiting may cure it (see [`retry::Failure::is_transient`]).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Nats { failure, .. } => failure.is_transient(),
            _ => false,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
