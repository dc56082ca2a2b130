//! The verification driver: reads a process's runs in order and feeds them to the
//! pure [`ChainVerifier`]. A record that cannot be read or decoded is itself a
//! fault at the slot that was expected next.

use futures::StreamExt;

use protocol::verify::{ChainVerifier, Fault, FaultKind, TrustedKeys};
use protocol::ProcessId;

use crate::reader::LogReader;
use crate::{Error, Result};

/// What to verify.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The process.
    pub process: ProcessId,
    /// First slot to check (its whole run is checked).
    pub from: u64,
    /// Last slot to check (inclusive); none: up to the head when verification starts.
    pub to: Option<u64>,
    /// Key ids that must commit to every run.
    pub required: Vec<String>,
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Assignments checked and found good.
    pub checked: u64,
    /// The last good slot, if any.
    pub last_good: Option<u64>,
    /// The first fault, if any.
    pub fault: Option<Fault>,
}

/// Verifies `scope` against `trusted`, calling `progress(checked_through_slot)` after
/// each run so long ranges can show progress.
pub async fn verify(
    reader: &LogReader,
    scope: &Scope,
    trusted: TrustedKeys,
    mut progress: impl FnMut(u64),
) -> Result<Report> {
    let head = reader.head(&scope.process).await?;
    let Some(head) = head else {
        return Ok(Report {
            checked: 0,
            last_good: None,
            fault: None,
        });
    };
    let to = scope.to.unwrap_or(head.last_slot).min(head.last_slot);
    if scope.from > to {
        return Ok(Report {
            checked: 0,
            last_good: None,
            fault: None,
        });
    }
    let mut verifier = ChainVerifier::new(scope.process.clone(), trusted, scope.required.clone());
    let mut runs = reader.runs(&scope.process, scope.from, false).await?;
    let mut last_good = None;
    let mut expected = scope.from;
    while let Some(item) = runs.next().await {
        let stored = match item {
            Ok(s) => s,
            Err(Error::BadRecord { seq, reason }) => {
                let slot = verifier.next_slot().unwrap_or(expected);
                tracing::warn!(seq, %reason, "undecodable record");
                let fault = Fault {
                    slot,
                    kind: FaultKind::BadChainHash,
                };
                return Ok(Report {
                    checked: verifier.checked(),
                    last_good,
                    fault: Some(fault),
                });
            }
            Err(e) => return Err(e),
        };
        if let Err(fault) = verifier.feed(&stored.run) {
            return Ok(Report {
                checked: verifier.checked(),
                last_good,
                fault: Some(fault),
            });
        }
        last_good = Some(stored.run.last_slot());
        expected = stored.run.last_slot() + 1;
        progress(stored.run.last_slot());
        if stored.run.last_slot() >= to {
            break;
        }
    }
    // The log must reach `to`: a log that ends early has lost slots.
    if last_good.is_none_or(|s| s < to) {
        let fault = Fault {
            slot: expected,
            kind: FaultKind::Gap {
                expected,
                found: head.last_slot + 1,
            },
        };
        return Ok(Report {
            checked: verifier.checked(),
            last_good,
            fault: Some(fault),
        });
    }
    Ok(Report {
        checked: verifier.checked(),
        last_good,
        fault: None,
    })
}
