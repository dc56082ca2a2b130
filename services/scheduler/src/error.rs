//! The scheduler's error type.

/// Everything that can stop the scheduler (request-level problems are replies, not errors).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The NATS side failed (server too old, stream setup, ...).
    #[error(transparent)]
    Journal(#[from] journal::Error),
    /// A protocol-level problem (bad prefix, key file, ...).
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
    /// The services API could not be started.
    #[error("services API: {0}")]
    Service(String),
    /// The configuration is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// Reading a key file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
