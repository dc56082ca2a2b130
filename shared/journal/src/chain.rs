//! A process's chain as schemas/chain.md defines it, read from JetStream: every
//! message of the process's subject is judged by [`LogVerifier`]; foreign messages
//! are reported and skipped, never part of the chain. The scheduler, the CLI and the
//! workers all read the chain through here.

use futures::{Stream, StreamExt};

use protocol::verify::{
    check_key_change, check_run, ChainPoint, Fault, FaultKind, LogVerifier, TrustedKeys, Verdict,
};
use protocol::wire::Run;
use protocol::{chain, ProcessId};

use crate::reader::{LogMessage, LogReader, StoredRun};
use crate::Result;

/// A process's head, verified.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Where the chain stands: the genesis point for a process without runs.
    pub point: ChainPoint,
    /// The last run of the chain, if any.
    pub head_run: Option<StoredRun>,
    /// Stream sequence of the subject's last message, chain or foreign (0: none): what
    /// the next write must expect.
    pub tail_seq: u64,
    /// Faults met while loading (foreign messages, losses), in stream order.
    pub faults: Vec<Fault>,
    /// True when the whole subject had to be read (the tail was not a run of the chain
    /// that links to the run before it); false for the three-read fast path.
    pub scanned: bool,
}

/// One judged message.
#[derive(Debug, Clone)]
pub enum Judged {
    /// A run of the chain; `lost` says what the log lost before it.
    Chain {
        /// The run.
        run: StoredRun,
        /// Data-loss faults noticed on the way to it (normally none).
        lost: Vec<Fault>,
    },
    /// A foreign message, skipped.
    Foreign(Fault),
}

/// Judges one message with `verifier`.
pub fn judge(verifier: &mut LogVerifier, msg: LogMessage) -> Judged {
    let decoded = msg.decode();
    let checked = match &decoded {
        Ok(run) => check_run(
            run,
            verifier.process(),
            verifier.trusted(),
            verifier.required(),
        ),
        Err(_) => Ok(()),
    };
    judge_checked(verifier, msg, decoded, checked)
}

/// [`judge`], with the message already decoded and its run checked on its own
/// (`checked` as [`LogVerifier::feed_checked`] says), e.g. on another thread.
pub fn judge_checked(
    verifier: &mut LogVerifier,
    msg: LogMessage,
    decoded: Result<Run, String>,
    checked: Result<(), FaultKind>,
) -> Judged {
    let slot = verifier.point().map(|p| p.next_slot).unwrap_or(0);
    let verdict = verifier.feed_checked(msg.seq, decoded.as_ref().map_err(Clone::clone), checked);
    let fault = |kind| Fault {
        seq: msg.seq,
        slot,
        kind,
    };
    match (verdict, decoded) {
        (Verdict::Chain { lost }, Ok(run)) => {
            let lost = lost.into_iter().map(fault).collect();
            Judged::Chain {
                run: msg.into_stored(run),
                lost,
            }
        }
        (Verdict::Foreign(kind), _) => Judged::Foreign(fault(kind)),
        // A verdict of chain needs a decoded run; this arm cannot be reached.
        (Verdict::Chain { .. }, Err(why)) => Judged::Foreign(fault(FaultKind::Undecodable(why))),
    }
}

/// The verified head of `process`. Fast path (three reads from the stream leader):
/// the subject's last message is a run sealed by a trusted key (and by every key it
/// declares), sits right after the message it was written after, links to that
/// message's run and, if it declares another key set than that run, is sealed by
/// that run's keys too. Anything else
/// (a foreign tail, a loss, a first run that is not first) reads the whole subject
/// and applies the rule message by message.
pub async fn load_head(
    reader: &LogReader,
    process: &ProcessId,
    trusted: &TrustedKeys,
) -> Result<Loaded> {
    let Some(last) = reader.last_message(process).await? else {
        return Ok(Loaded {
            point: genesis(process),
            head_run: None,
            tail_seq: 0,
            faults: vec![],
            scanned: false,
        });
    };
    if let Ok(run) = last.decode() {
        if check_run(&run, process, trusted, &[]).is_ok()
            && fast_path_holds(reader, process, trusted, &run, last.seq).await?
        {
            return Ok(Loaded {
                point: point_after(&run, last.seq),
                tail_seq: last.seq,
                head_run: Some(last.into_stored(run)),
                faults: vec![],
                scanned: false,
            });
        }
    }
    scan(reader, process, trusted, last.seq).await
}

/// Whether `run` (at `seq`, already checked alone) is in its place and links to the
/// run it was written after.
async fn fast_path_holds(
    reader: &LogReader,
    process: &ProcessId,
    trusted: &TrustedKeys,
    run: &Run,
    seq: u64,
) -> Result<bool> {
    if run.prev_seq == 0 {
        // The first message of the subject, starting the chain (check_run checked the
        // genesis link of slot 0).
        let first = reader.next_message(process, 1).await?;
        return Ok(run.first_slot == 0 && first.is_some_and(|m| m.seq == seq));
    }
    let Some(before) = reader.message_at(process, run.prev_seq).await? else {
        return Ok(false);
    };
    let Some(after) = reader.next_message(process, run.prev_seq + 1).await? else {
        return Ok(false);
    };
    if after.seq != seq {
        return Ok(false);
    }
    let Ok(prev) = before.decode() else {
        return Ok(false);
    };
    Ok(check_run(&prev, process, trusted, &[]).is_ok()
        && prev.last_slot() + 1 == run.first_slot
        && run.entries.first().map(|e| e.prev_hash) == Some(prev.head())
        && check_key_change(prev.declared(), run).is_ok())
}

/// Reads the whole subject through `end` and applies the rule.
async fn scan(
    reader: &LogReader,
    process: &ProcessId,
    trusted: &TrustedKeys,
    end: u64,
) -> Result<Loaded> {
    let mut verifier = LogVerifier::from_genesis(process.clone(), trusted.clone(), vec![]);
    let mut messages = reader.messages(process, 1, Some(end)).await?;
    let mut head_run = None;
    let mut faults = Vec::new();
    while let Some(msg) = messages.next().await {
        match judge(&mut verifier, msg?) {
            Judged::Chain { run, lost } => {
                faults.extend(lost);
                head_run = Some(run);
            }
            Judged::Foreign(f) => faults.push(f),
        }
    }
    Ok(Loaded {
        point: verifier
            .point()
            .cloned()
            .unwrap_or_else(|| genesis(process)),
        head_run,
        tail_seq: verifier.last_seq().unwrap_or(end).max(end),
        faults,
        scanned: true,
    })
}

/// The judged messages of `process` from stream sequence `start` through `end` (none:
/// follow new messages), judged by `verifier` (which must stand right before `start`).
pub async fn judged(
    reader: &LogReader,
    process: &ProcessId,
    mut verifier: LogVerifier,
    start: u64,
    end: Option<u64>,
) -> Result<impl Stream<Item = Result<Judged>> + Unpin> {
    let messages = reader.messages(process, start, end).await?;
    Ok(Box::pin(
        messages.map(move |m| m.map(|m| judge(&mut verifier, m))),
    ))
}

/// The judged messages of `process` from the run holding slot `from` (the whole
/// subject when `from` is 0) through the tail as it is now, or following with
/// `follow`. From slot 0 the rule is applied from genesis; from a later slot the
/// first run found there is taken as given (its place and first `prev_hash`).
pub async fn from_slot(
    reader: &LogReader,
    process: &ProcessId,
    trusted: &TrustedKeys,
    from: u64,
    follow: bool,
) -> Result<impl Stream<Item = Result<Judged>> + Unpin> {
    let (verifier, start, tail) = start_at(reader, process, trusted, from).await?;
    let end = if follow { None } else { Some(tail) };
    judged(reader, process, verifier, start, end).await
}

/// Where [`from_slot`] starts: the verifier, the stream sequence to read from, and
/// the subject's last stream sequence now (0: empty).
pub async fn start_at(
    reader: &LogReader,
    process: &ProcessId,
    trusted: &TrustedKeys,
    from: u64,
) -> Result<(LogVerifier, u64, u64)> {
    let tail = reader
        .last_message(process)
        .await?
        .map(|m| m.seq)
        .unwrap_or(0);
    Ok(if from == 0 {
        (
            LogVerifier::from_genesis(process.clone(), trusted.clone(), vec![]),
            1,
            tail,
        )
    } else {
        let start = reader.locate(process, from).await?.unwrap_or(tail + 1);
        (
            LogVerifier::resume(process.clone(), trusted.clone(), vec![], None, None),
            start,
            tail,
        )
    })
}

/// The chain point of a process with no run.
pub fn genesis(process: &ProcessId) -> ChainPoint {
    ChainPoint {
        next_slot: 0,
        prev: chain::genesis(process),
        seq: 0,
        keys: None,
    }
}

/// The chain point after `run`, stored at `seq`.
pub fn point_after(run: &Run, seq: u64) -> ChainPoint {
    ChainPoint {
        next_slot: run.last_slot() + 1,
        prev: run.head(),
        seq,
        keys: run.keys.clone(),
    }
}
