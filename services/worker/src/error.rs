//! The worker crate's one error type.

/// Everything that can go wrong in a worker instance or its feeder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A JetStream or NATS operation failed (which, and why).
    #[error("{op}: {reason}")]
    Nats {
        /// What was being done.
        op: &'static str,
        /// The library's reason.
        reason: String,
    },
    /// The configuration cannot work.
    #[error("worker config: {0}")]
    Config(String),
    /// A message in the work stream is not a job this version can read.
    #[error("malformed job: {0}")]
    MalformedJob(String),
    /// The group's checkpoint was written by someone else meanwhile: this feeder's
    /// lease is stale (fencing by revision).
    #[error("feeder fenced off: {0}")]
    Fenced(String),
    /// The instance was closed: no more jobs are taken.
    #[error("worker closed")]
    Closed,
    /// From the shared crates.
    #[error(transparent)]
    Journal(#[from] journal::Error),
    /// From the ownership crate.
    #[error(transparent)]
    Ownership(#[from] ownership::Error),
    /// From the service skeleton.
    #[error("service: {0}")]
    Service(String),
}

impl Error {
    /// A NATS failure of `op`.
    pub fn nats(op: &'static str, e: impl std::fmt::Display) -> Error {
        Error::Nats {
            op,
            reason: e.to_string(),
        }
    }
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
