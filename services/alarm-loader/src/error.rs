//! The alarm-loader's error type.

use crate::cron::Field;

/// Everything the alarm-loader refuses or fails at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The schedule expression is empty.
    #[error("empty schedule expression")]
    EmptyExpression,
    /// A cron expression has neither 5 nor 6 fields.
    #[error(
        "a cron expression has 6 fields (second minute hour day-of-month month day-of-week) \
         or 5 (no seconds: fires at second 0); found {found}"
    )]
    FieldCount {
        /// How many fields were given.
        found: usize,
    },
    /// One field of a cron expression is wrong.
    #[error("{field} field (field {position} of the expression) `{text}`: {reason}")]
    Field {
        /// Which field.
        field: Field,
        /// Its 1-based position in the expression as written.
        position: usize,
        /// The field as written.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The fields are right one by one but not together (the cron crate's words).
    #[error("cron expression `{expression}`: {reason}")]
    Expression {
        /// The expression as written.
        expression: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The expression is valid but matches no date (`0 0 0 30 2 *`: 30 February).
    #[error("cron expression `{expression}` never fires")]
    NeverFires {
        /// The expression as written.
        expression: String,
    },
    /// `@something` that is not one of the known aliases.
    #[error(
        "unknown alias `@{alias}` (known: @yearly @annually @monthly @weekly @daily @midnight \
         @hourly @every)"
    )]
    UnknownAlias {
        /// The alias without its `@`.
        alias: String,
    },
    /// An alias other than `@every` was given an argument.
    #[error("alias `@{alias}` takes no argument, found `{argument}`")]
    AliasArgument {
        /// The alias without its `@`.
        alias: String,
        /// What followed it.
        argument: String,
    },
    /// The duration of `@every` cannot be read.
    #[error("@every `{text}`: {reason} (write e.g. 90s, 15m, 1h30m, 1d)")]
    Every {
        /// The duration as written.
        text: String,
        /// What is wrong, and at which byte.
        reason: String,
    },
    /// The duration of `@every` is shorter than one second.
    #[error("@every `{text}` is shorter than the minimum of 1s")]
    EveryTooShort {
        /// The duration as written.
        text: String,
    },
    /// No IANA time zone of that name in the bundled database.
    #[error("unknown time zone `{name}` (an IANA name such as Europe/Berlin, or UTC)")]
    UnknownZone {
        /// The name given.
        name: String,
    },
    /// A policy name that is not one of the choices.
    #[error("unknown {what} policy `{value}` (one of: {choices})")]
    UnknownPolicy {
        /// Which policy (`gap`, `fold`, `missed`).
        what: &'static str,
        /// The value given.
        value: String,
        /// The accepted values.
        choices: &'static str,
    },
    /// A job name outside the allowed alphabet or length.
    #[error("invalid job name `{name}`: {reason}")]
    InvalidJobName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A string that is not a tick id (`<job>-<utc_ms>`).
    #[error("invalid tick id `{0}` (expected <job>-<utc_ms>)")]
    InvalidTickId(String),
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
    /// From the journal crate (setup, server checks).
    #[error("{0}")]
    Journal(String),
    /// From the service skeleton.
    #[error("{0}")]
    Service(String),
    /// A task of the loader loop's upkeep (window load, catch-up, sweep, ...) panicked:
    /// a defect; the loader stops rather than run on without it.
    #[error("the alarm loop's {0} panicked (a defect); the loader stops so that it is restarted")]
    Panicked(&'static str),
}

impl Error {
    /// A JetStream error of operation `op`.
    pub fn js(op: &'static str, e: impl std::fmt::Display) -> Error {
        Error::JetStream {
            op,
            reason: e.to_string(),
        }
    }
}

impl From<journal::Error> for Error {
    fn from(e: journal::Error) -> Error {
        Error::Journal(e.to_string())
    }
}

impl From<service::Error> for Error {
    fn from(e: service::Error) -> Error {
        Error::Service(e.to_string())
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
