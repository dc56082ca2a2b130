//! Process ids. A process id is one NATS subject token, so it is validated once,
//! here, and carried as a [`ProcessId`] afterwards.

use std::fmt;

use crate::{Error, Result};

/// The longest process id accepted, in bytes.
pub const MAX_PROCESS_LEN: usize = 200;

/// A validated process id: 1 to [`MAX_PROCESS_LEN`] characters of `A-Z a-z 0-9 - _`.
/// That alphabet covers AO/Arweave ids (base64url) and UUIDs, and is always a valid
/// single NATS subject token and KV key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessId(String);

impl ProcessId {
    /// Validates `s` as a process id.
    pub fn new(s: impl Into<String>) -> Result<ProcessId> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= MAX_PROCESS_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(ProcessId(s))
        } else {
            Err(Error::InvalidProcess(s))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProcessId({})", self.0)
    }
}

impl std::str::FromStr for ProcessId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ProcessId::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_subject_safe_ids_and_refuses_the_rest() {
        for good in ["a", "proc-1", "AbC_09", &"x".repeat(MAX_PROCESS_LEN)] {
            assert!(ProcessId::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a.b",
            "a*",
            ">",
            "a b",
            "ä",
            &"x".repeat(MAX_PROCESS_LEN + 1),
        ] {
            assert!(
                matches!(ProcessId::new(bad), Err(Error::InvalidProcess(_))),
                "{bad}"
            );
        }
    }
}
