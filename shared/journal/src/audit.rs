//! The verification driver: reads a process's subject to its end, judges every
//! message by the rule of schemas/chain.md ([`crate::chain`]) and collects every
//! fault, each naming its stream sequence. [`processes`] lists every process of a
//! deployment, for verifying them all.

use futures::{StreamExt, TryStreamExt};

use protocol::verify::{Fault, FaultKind, TrustedKeys};
use protocol::ProcessId;

use crate::chain::{self, Judged};
use crate::reader::LogReader;
use crate::subjects::Subjects;
use crate::{Error, Result};

/// What to verify.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The process.
    pub process: ProcessId,
    /// First slot to check (its whole run is checked; 0: from genesis). The chain
    /// must reach it: a `from` beyond the chain's end is a gap fault.
    pub from: u64,
    /// The chain must reach this slot (inclusive); none: no requirement. The subject
    /// is read to its end either way.
    pub to: Option<u64>,
    /// Key ids that must commit to every run (a run without one is a fault; it still
    /// holds its slots).
    pub required: Vec<String>,
}

/// The outcome of a verification (and its progress so far, while it runs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// Assignments of the chain checked.
    pub checked: u64,
    /// Runs of the chain read.
    pub runs: u64,
    /// Messages read from the subject, chain or foreign.
    pub messages: u64,
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

/// Verifies `scope` against `trusted`: reads the process's subject from the run
/// holding `scope.from` to the subject's last message as it is when the
/// verification starts, and calls `progress` with the report so far after each
/// message, so long logs can show progress.
pub async fn verify(
    reader: &LogReader,
    scope: &Scope,
    trusted: TrustedKeys,
    mut progress: impl FnMut(&Report),
) -> Result<Report> {
    let mut judged = chain::from_slot(reader, &scope.process, &trusted, scope.from, false).await?;
    let mut report = Report::default();
    while let Some(item) = judged.next().await {
        report.messages += 1;
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
            }
            Judged::Foreign(f) => {
                report.tail_seq = f.seq;
                report.faults.push(f);
            }
        }
        progress(&report);
    }
    // The chain must reach `to`, and `from` when verification starts past genesis.
    let must_reach = scope.to.or((scope.from > 0).then_some(scope.from));
    if let Some(to) = must_reach {
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

/// One subject of the log stream: a process (or a subject that names none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The subject, `<prefix>.log.<token>`.
    pub subject: String,
    /// Its process; none when the token is not a valid process id (nothing the
    /// scheduler writes: someone published there).
    pub process: Option<ProcessId>,
    /// How many messages the subject holds.
    pub messages: u64,
}

/// Every subject of the log stream `<PREFIX>_LOG` under `<prefix>.log.*`, i.e. every
/// process of the deployment, sorted by subject (the stream info pages through
/// them; one request per ~100,000 subjects).
pub async fn processes(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
) -> Result<Vec<Listed>> {
    let stream = js
        .get_stream(subjects.log_stream())
        .await
        .map_err(|e| jetstream("open log stream", e))?;
    let mut listed: Vec<Listed> = stream
        .info_with_subjects(subjects.log_all())
        .await
        .map_err(|e| jetstream("list log subjects", e))?
        .map_err(|e| jetstream("list log subjects", e))
        .map_ok(|(subject, count)| Listed {
            process: subjects.process_of_log(&subject),
            subject,
            messages: count as u64,
        })
        .try_collect()
        .await?;
    listed.sort_by(|a, b| a.subject.cmp(&b.subject));
    listed.dedup_by(|a, b| a.subject == b.subject);
    Ok(listed)
}

fn jetstream(op: &'static str, e: impl std::fmt::Display) -> Error {
    Error::JetStream {
        op,
        reason: e.to_string(),
    }
}
