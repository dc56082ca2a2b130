//! The verification driver: reads a process's subject to its end, judges every
//! message by the rule of schemas/chain.md ([`crate::chain`]) and collects every
//! fault, each naming its stream sequence.

use futures::StreamExt;

use protocol::verify::{Fault, FaultKind, TrustedKeys};
use protocol::ProcessId;

use crate::chain::{self, Judged};
use crate::reader::LogReader;
use crate::Result;

/// What to verify.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The process.
    pub process: ProcessId,
    /// First slot to check (its whole run is checked; 0: from genesis).
    pub from: u64,
    /// The chain must reach this slot (inclusive); none: no requirement. The subject
    /// is read to its end either way.
    pub to: Option<u64>,
    /// Key ids that must commit to every run (a run without one is a fault; it still
    /// holds its slots).
    pub required: Vec<String>,
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Assignments of the chain checked.
    pub checked: u64,
    /// Runs of the chain read.
    pub runs: u64,
    /// The last slot of the chain, if any.
    pub last_good: Option<u64>,
    /// Every fault, in stream order.
    pub faults: Vec<Fault>,
    /// Stream sequence of the last message read.
    pub tail_seq: u64,
}

impl Report {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.faults.is_empty()
    }
}

/// Verifies `scope` against `trusted`, calling `progress(last_slot_so_far)` after each
/// run so long logs can show progress.
pub async fn verify(
    reader: &LogReader,
    scope: &Scope,
    trusted: TrustedKeys,
    mut progress: impl FnMut(u64),
) -> Result<Report> {
    let mut judged =
        chain::from_slot(reader, &scope.process, &trusted, scope.from, false).await?;
    let mut report = Report {
        checked: 0,
        runs: 0,
        last_good: None,
        faults: vec![],
        tail_seq: 0,
    };
    while let Some(item) = judged.next().await {
        match item? {
            Judged::Chain { run, lost } => {
                report.faults.extend(lost);
                let next_slot = run.run.first_slot;
                for k in &scope.required {
                    if !run.run.seal.commitments.iter().any(|c| &c.key_id == k) {
                        report.faults.push(Fault {
                            seq: run.seq,
                            slot: next_slot,
                            kind: FaultKind::MissingKey(k.clone()),
                        });
                    }
                }
                report.checked += run.run.entries.len() as u64;
                report.runs += 1;
                report.last_good = Some(run.run.last_slot());
                report.tail_seq = run.seq;
                progress(run.run.last_slot());
            }
            Judged::Foreign(f) => {
                report.tail_seq = f.seq;
                report.faults.push(f);
            }
        }
    }
    if let Some(to) = scope.to {
        let next = report.last_good.map(|s| s + 1).unwrap_or(scope.from);
        if next <= to {
            report.faults.push(Fault {
                seq: report.tail_seq,
                slot: next,
                kind: FaultKind::Gap {
                    expected: next,
                    found: to + 1,
                },
            });
        }
    }
    Ok(report)
}
