//! The verification driver: reads the log once — one process's subject, or the
//! whole stream for every process — judges every message by the rule of
//! schemas/chain.md ([`crate::chain`]) with its subject's own verifier, and collects
//! every fault, each naming its stream sequence. [`processes`] lists every process
//! of a deployment.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use protocol::verify::{check_run, Fault, FaultKind, LogVerifier, TrustedKeys};
use protocol::ProcessId;

use crate::chain::{self, Judged};
use crate::reader::{LogMessage, LogReader, StreamMessage};
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
    /// Key ids that must commit to every run on top of the keys each run declares
    /// (a run without one is a `missing_key` fault; it still holds its slots). The
    /// declared keys and their handovers are checked by the rule itself.
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

/// What one read of the log verifies.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every subject of the log stream (`<prefix>.log.*`), each from its first
    /// message; every run must also carry the keys `required` names (as
    /// [`Scope::required`]).
    All {
        /// Key ids that must commit to every run, on top of what each run declares.
        required: Vec<String>,
    },
    /// One process, from the run holding `scope.from`.
    One(Scope),
}

/// The verdict on one subject of the log stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The subject, `<prefix>.log.<token>`.
    pub subject: String,
    /// Its process; none when the token is not a valid process id (nothing the
    /// scheduler writes: someone published there). Such a subject's messages belong
    /// to no chain and are not judged.
    pub process: Option<ProcessId>,
    /// What was found (empty for a subject that names no process).
    pub report: Report,
}

/// How far a verification has come, over every subject it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    /// Messages the read expects (what its consumer had pending when it was made).
    pub expected: u64,
    /// Messages judged so far.
    pub messages: u64,
    /// Assignments of chains checked so far.
    pub assignments: u64,
    /// Faults so far (a subject that names no process counts one).
    pub faults: u64,
    /// Subjects met so far.
    pub subjects: u64,
}

/// Verifies `scope` against `trusted`: reads the process's subject from the run
/// holding `scope.from` to the subject's last message as it is when the
/// verification starts, and calls `progress` with the report so far after each
/// message, so long logs can show progress. The same read as [`verify_log`], over
/// one subject.
pub async fn verify(
    reader: &LogReader,
    scope: &Scope,
    trusted: TrustedKeys,
    mut progress: impl FnMut(&Report),
) -> Result<Report> {
    let selection = Selection::One(scope.clone());
    let mut verified = verify_log(reader, &selection, trusted, AHEAD, |_, r| progress(r)).await?;
    Ok(verified.pop().map(|v| v.report).unwrap_or_default())
}

/// Verifies what `selection` names against `trusted` with **one** read of the log
/// stream: a single pull consumer (filtered to the process's subject for
/// [`Selection::One`], to every log subject for [`Selection::All`]) delivers every
/// message in stream order, from the first one to verify through the last one
/// stored when the verification starts, and each is judged by its subject's own
/// [`LogVerifier`] as it arrives (schemas/chain.md: the rule is per subject, in
/// stream order, so one ordered pass over the stream judges every subject exactly
/// as a read of each subject alone would). Decoding and checking each run alone
/// (hashes, Merkle root, seal) is nearly all the work and depends on nothing but the
/// run: it runs on blocking threads, up to `parallel` chunks of messages ahead, while
/// this task applies the rest of the rule in stream order.
///
/// `progress` is called after each judged message with the totals so far and that
/// message's subject's report. Returns one verdict per subject, sorted by subject.
pub async fn verify_log(
    reader: &LogReader,
    selection: &Selection,
    trusted: TrustedKeys,
    parallel: usize,
    mut progress: impl FnMut(&Tally, &Report),
) -> Result<Vec<Verified>> {
    let subjects = reader.subjects().clone();
    let mut states: BTreeMap<String, Checking> = BTreeMap::new();
    let mut tally = Tally::default();
    let (filter, start, end, required) = match selection {
        Selection::One(scope) => {
            let (verifier, start, tail) =
                chain::start_at(reader, &scope.process, &trusted, scope.from).await?;
            let subject = subjects.log(&scope.process);
            states.insert(
                subject.clone(),
                Checking {
                    process: Some(scope.process.clone()),
                    verifier: Some(verifier),
                    report: Report::default(),
                    from: scope.from,
                    to: scope.to,
                    required: scope.required.clone(),
                },
            );
            tally.subjects = 1;
            (subject, start, tail, scope.required.clone())
        }
        Selection::All { required } => (
            subjects.log_all(),
            1,
            reader.last_sequence().await?,
            required.clone(),
        ),
    };
    let (expected, messages) = reader.read_range(filter, start, end).await?;
    tally.expected = expected;
    let trusted = Arc::new(trusted);
    let alone = {
        let (trusted, subjects) = (Arc::clone(&trusted), subjects.clone());
        move |chunk: Vec<StreamMessage>| {
            chunk
                .into_iter()
                .map(|m| {
                    let process = subjects.process_of_log(&m.subject);
                    let decoded = m.message.decode();
                    let checked = match (&process, &decoded) {
                        (Some(p), Ok(run)) => check_run(run, p, &trusted, &[]),
                        _ => Ok(()),
                    };
                    (m, process, decoded, checked)
                })
                .collect::<Vec<_>>()
        }
    };
    let mut checked = messages
        .ready_chunks(CHUNK)
        .map(move |chunk| {
            let alone = alone.clone();
            async move {
                let chunk = chunk.into_iter().collect::<Result<Vec<_>>>()?;
                let bytes: usize = chunk.iter().map(|m| m.message.payload.len()).sum();
                if bytes < SMALL_CHUNK {
                    Ok(alone(chunk))
                } else {
                    tokio::task::spawn_blocking(move || alone(chunk))
                        .await
                        .map_err(|e| jetstream("check runs", e))
                }
            }
        })
        .buffered(parallel.max(1));
    while let Some(chunk) = checked.next().await {
        for (m, process, decoded, run_checked) in chunk? {
            let state = states.entry(m.subject).or_insert_with(|| {
                tally.subjects += 1;
                tally.faults += u64::from(process.is_none());
                Checking {
                    verifier: process
                        .as_ref()
                        .map(|p| LogVerifier::from_genesis(p.clone(), (*trusted).clone(), vec![])),
                    process,
                    report: Report::default(),
                    from: 0,
                    to: None,
                    required: required.clone(),
                }
            });
            let Some(verifier) = state.verifier.as_mut() else {
                // A subject that names no process: its messages belong to no chain.
                continue;
            };
            let (checked_before, faults_before) = (state.report.checked, state.report.faults.len());
            judge_into(
                verifier,
                &state.required,
                &mut state.report,
                m.message,
                decoded,
                run_checked,
            );
            tally.messages += 1;
            tally.assignments += state.report.checked - checked_before;
            tally.faults += (state.report.faults.len() - faults_before) as u64;
            progress(&tally, &state.report);
        }
    }
    Ok(states
        .into_iter()
        .map(|(subject, mut state)| {
            if state.process.is_some() {
                reach(&mut state);
            }
            Verified {
                subject,
                process: state.process,
                report: state.report,
            }
        })
        .collect())
}

/// One subject being verified.
struct Checking {
    process: Option<ProcessId>,
    /// None for a subject that names no process.
    verifier: Option<LogVerifier>,
    report: Report,
    from: u64,
    to: Option<u64>,
    required: Vec<String>,
}

/// The chain must reach `to`, and `from` when verification starts past genesis.
fn reach(state: &mut Checking) {
    let report = &mut state.report;
    let must_reach = state.to.or((state.from > 0).then_some(state.from));
    if let Some(to) = must_reach {
        let next = report.last_good.map(|s| s + 1).unwrap_or(state.from);
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
}

/// Judges one message of a subject (already decoded and checked alone) into its
/// report.
fn judge_into(
    verifier: &mut LogVerifier,
    required: &[String],
    report: &mut Report,
    msg: LogMessage,
    decoded: std::result::Result<protocol::wire::Run, String>,
    run_checked: std::result::Result<(), FaultKind>,
) {
    report.messages += 1;
    match chain::judge_checked(verifier, msg, decoded, run_checked) {
        Judged::Chain { run, lost } => {
            report.faults.extend(lost);
            let next_slot = run.run.first_slot;
            for k in required {
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
}

/// Chunks of messages checked ahead of the one being judged, by default.
pub const AHEAD: usize = 8;

/// Most messages checked together (one hand-off to a blocking thread).
const CHUNK: usize = 64;

/// Bytes under which a chunk is checked on the reading task itself (a thread
/// hand-off would cost more than the work).
const SMALL_CHUNK: usize = 16 * 1024;

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
