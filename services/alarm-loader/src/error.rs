//! The crate's one error type.

/// Everything that can go wrong in the alarm-loader.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An alarm that cannot be stored as given; names the field.
    #[error("invalid alarm: {0}")]
    Invalid(String),
    /// A stored record that does not decode (another writer, or a newer version).
    #[error("bad alarm record at {subject} (sequence {seq}): {reason}")]
    BadRecord {
        /// Its subject.
        subject: String,
        /// Its stream sequence.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Another writer changed the alarm since it was read (compare-and-set lost).
    #[error("alarm {0} changed meanwhile")]
    Conflict(String),
    /// JetStream refused or did not answer.
    #[error("{op}: {reason}")]
    JetStream {
        /// What was being done.
        op: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// From the journal crate.
    #[error(transparent)]
    Journal(#[from] journal::Error),
    /// From the service skeleton.
    #[error(transparent)]
    Service(#[from] service::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A JetStream error of operation `op`.
    pub fn js(op: &'static str, e: impl std::fmt::Display) -> Error {
        Error::JetStream {
            op,
            reason: e.to_string(),
        }
    }
}
