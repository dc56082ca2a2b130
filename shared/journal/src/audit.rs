//! The verification driver: reads a process's subject to its end, judges every
//! message by the rule of schemas/chain.md ([`crate::chain`]) and collects every
//! fault, each naming its stream sequence. [`processes`] lists every process of a
//! deployment, for verifying them all.

use futures::{StreamExt, TryStreamExt};

use std::sync::Arc;

use async_nats::jetstream::consumer;

use protocol::verify::{check_run, Fault, FaultKind, LogVerifier, TrustedKeys};
use protocol::ProcessId;

use crate::chain::{self, Judged};
use crate::reader::{LogMessage, LogReader};
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
    let (mut verifier, start, tail) =
        chain::start_at(reader, &scope.process, &trusted, scope.from).await?;
    let mut report = Report::default();
    if tail >= start {
        // An ordered consumer of our own, deleted as soon as it is read: verifying
        // every process of a deployment must not leave thousands behind (the server
        // caps them, and each would stay for 30 s).
        let stream = reader
            .jetstream()
            .get_stream_no_info(reader.subjects().log_stream())
            .await
            .map_err(|e| jetstream("open log stream", e))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: reader.subjects().log(&scope.process),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| jetstream("create reader", e))?;
        let name = consumer.cached_info().name.clone();
        let read = judge_through(
            consumer,
            tail,
            &mut verifier,
            scope,
            trusted,
            &mut report,
            &mut progress,
        )
        .await;
        if let Err(e) = stream.delete_consumer(&name).await {
            tracing::debug!(error = %e, consumer = %name, "could not delete the reader (it expires by itself)");
        }
        read?;
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

/// Reads `consumer` through stream sequence `tail` and judges every message into
/// `report`. Decoding and checking each run alone (hashes, Merkle root, seal) is nearly
/// all the work, and depends on nothing but the run: it runs on blocking threads, a
/// few runs ahead, while this task applies the rest of the rule in stream order.
async fn judge_through(
    consumer: consumer::Consumer<consumer::pull::OrderedConfig>,
    tail: u64,
    verifier: &mut LogVerifier,
    scope: &Scope,
    trusted: TrustedKeys,
    report: &mut Report,
    progress: &mut impl FnMut(&Report),
) -> Result<()> {
    let messages = consumer
        .messages()
        .await
        .map_err(|e| jetstream("read runs", e))?;
    let alone = Arc::new((scope.process.clone(), trusted, verifier.required().to_vec()));
    let mut checked = messages
        .map(move |m| {
            let alone = Arc::clone(&alone);
            async move {
                let m = m.map_err(|e| jetstream("read runs", e))?;
                let msg = LogMessage {
                    seq: m.info().map(|i| i.stream_sequence).unwrap_or(0),
                    headers: m.headers.clone().unwrap_or_default(),
                    payload: m.payload.clone(),
                };
                let small = msg.payload.len() < SMALL_RUN;
                let work = move || {
                    let decoded = msg.decode();
                    let checked = match &decoded {
                        Ok(run) => check_run(run, &alone.0, &alone.1, &alone.2),
                        Err(_) => Ok(()),
                    };
                    (msg, decoded, checked)
                };
                if small {
                    Ok(work())
                } else {
                    tokio::task::spawn_blocking(work)
                        .await
                        .map_err(|e| jetstream("check runs", e))
                }
            }
        })
        .buffered(AHEAD);
    while let Some(item) = checked.next().await {
        let (msg, decoded, run_checked) = item?;
        let seq = msg.seq;
        report.messages += 1;
        match chain::judge_checked(verifier, msg, decoded, run_checked) {
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
        progress(report);
        // Stop at the tail as it was when verification started, without waiting for
        // a message that may never come.
        if seq >= tail {
            break;
        }
    }
    Ok(())
}

/// Runs decoded and checked ahead of the one being judged.
const AHEAD: usize = 8;

/// Bytes under which a run is checked on the reading task itself (a thread hand-off
/// would cost more than the work).
const SMALL_RUN: usize = 16 * 1024;

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
