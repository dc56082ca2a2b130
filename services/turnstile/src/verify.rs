//! `turnstile verify`: one process or every process of the deployment, by the rule of
//! schemas/chain.md ("Verifying a log"), each read to the end of its subject — all of
//! them in one read of the log stream (`journal::audit::verify_log`). Every
//! fault is printed with its stream sequence, the slot the chain expected there, its
//! code and what is wrong; `--json` prints one document instead.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use journal::audit::{self, Report, Scope, Selection, Tally};
use journal::reader::LogReader;
use journal::subjects::Subjects;
use journal::{keyring, setup};
use protocol::keys::KeyFile;
use protocol::verify::{Fault, TrustedKeys};
use protocol::ProcessId;
use serde_json::json;

/// Exit status: every message of every process verified, no fault.
pub const OK: i32 = 0;
/// Exit status: at least one fault.
pub const FAULTS: i32 = 1;
/// Exit status: usage, connection or JetStream error (the verdict is incomplete).
pub const ERROR: i32 = 2;

/// `turnstile verify`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Every message of a process's subject is judged, from its first message (or the run \
holding --from) to the last one on the subject when verification starts; a message \
that is not part of the chain (replayed, forged, garbage, ...) is reported and \
skipped, and the runs after it are still checked.

Exit status: 0 no fault; 1 at least one fault; 2 usage, connection or JetStream \
error (with --all: some process could not be read).")]
pub struct Args {
    /// The process to verify.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    process: Option<String>,
    /// Verify every process of the deployment (every subject of the log stream), in
    /// one read of the whole log stream.
    #[arg(long)]
    all: bool,
    /// First slot to verify (its whole run is checked). The chain must reach it.
    #[arg(long, default_value_t = 0, conflicts_with = "all")]
    from: u64,
    /// Last slot the chain must reach (inclusive): a slot beyond the chain's end is a
    /// gap fault. The subject is read to its end either way.
    #[arg(long, conflicts_with = "all")]
    to: Option<u64>,
    /// Trust only the public keys in these key files (repeatable) instead of the keys
    /// published in the deployment's keys bucket.
    #[arg(long = "trust", value_name = "KEY_FILE")]
    trust: Vec<PathBuf>,
    /// Key ids that must have committed to every run, on top of the keys each run
    /// declares (repeatable, or comma-separated). Default: none. What a process
    /// required when is read from its log (each run declares its required keys, and a
    /// change is sealed by the keys it replaces: schemas/chain.md); today's settings
    /// are never applied to history.
    #[arg(long = "require", value_name = "KEY_ID", value_delimiter = ',')]
    require: Vec<String>,
    /// Print one JSON document (per process: checked, runs, last_slot, faults; totals)
    /// instead of text.
    #[arg(long)]
    json: bool,
    /// How many chunks of runs are checked at once, ahead of the one being judged
    /// [default: 2 × cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=4096))]
    jobs: Option<u64>,
    /// No progress line on standard error (it is shown only on a terminal anyway).
    #[arg(long)]
    no_progress: bool,
}

/// What was verified, and how it went.
struct Outcome {
    subject: String,
    process: Option<ProcessId>,
    result: Result<Report, String>,
}

/// The totals the verification stores and the progress line reads.
#[derive(Default)]
struct Progress {
    expected: AtomicU64,
    assignments: AtomicU64,
    messages: AtomicU64,
    faults: AtomicU64,
    subjects: AtomicU64,
}

impl Progress {
    fn store(&self, t: &Tally) {
        self.expected.store(t.expected, Ordering::Relaxed);
        self.assignments.store(t.assignments, Ordering::Relaxed);
        self.messages.store(t.messages, Ordering::Relaxed);
        self.faults.store(t.faults, Ordering::Relaxed);
        self.subjects.store(t.subjects, Ordering::Relaxed);
    }
}

/// Runs `turnstile verify`; returns the exit status.
pub async fn run(client: async_nats::Client, subjects: Subjects, args: Args) -> Result<i32> {
    let js = async_nats::jetstream::new(client);
    let trusted = trusted_keys(&js, &subjects, &args.trust).await?;
    let selection = match &args.process {
        Some(p) => Selection::One(Scope {
            process: ProcessId::new(p.clone())?,
            from: args.from,
            to: args.to,
            required: args.require.clone(),
        }),
        None => Selection::All {
            required: args.require.clone(),
        },
    };
    let reader = LogReader::open(js, subjects.clone()).await?;
    let parallel = match args.jobs {
        Some(n) => n as usize,
        None => 2 * std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let show_progress = !args.no_progress && std::io::stderr().is_terminal();

    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let progress = Arc::new(Progress::default());
    // One read of the log for every process (journal::audit::verify_log), read again
    // whole while it fails transiently (a stream or consumer whose server is not
    // ready yet: right after a cluster restart a pull had no responders): reading is
    // idempotent, and a verdict comes only from a read that went through.
    let retry = journal::retry::Retry::new(journal::retry::Backoff {
        first: Duration::from_millis(250),
        max: Duration::from_secs(2),
        total: Duration::from_secs(30),
    });
    let verified = retry.run("read the log", || {
        let progress = Arc::clone(&progress);
        audit::verify_log(
            &reader,
            &selection,
            trusted.clone(),
            parallel,
            move |t, _| progress.store(t),
        )
    });
    tokio::pin!(verified);
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    let mut drawn = false;
    let verified = loop {
        tokio::select! {
            v = &mut verified => break v,
            _ = ticker.tick(), if show_progress => {
                draw(&progress, started.elapsed());
                drawn = true;
            }
        }
    };
    if drawn {
        eprint!("\r\x1b[2K");
    }
    let mut outcomes: Vec<Outcome> = match (verified, &selection) {
        (Ok(v), _) => v
            .into_iter()
            .map(|v| Outcome {
                subject: v.subject,
                process: v.process,
                result: Ok(v.report),
            })
            .collect(),
        (Err(e), Selection::One(scope)) => vec![Outcome {
            subject: subjects.log(&scope.process),
            process: Some(scope.process.clone()),
            result: Err(e.to_string()),
        }],
        (Err(e), Selection::All { .. }) => {
            eprintln!("turnstile: could not verify the log: {e}");
            return Ok(ERROR);
        }
    };
    let elapsed = started.elapsed();
    let cpu = cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);
    outcomes.sort_by(|a, b| a.subject.cmp(&b.subject));
    for outcome in &outcomes {
        let to_print = match (&outcome.process, &outcome.result) {
            (Some(_), Ok(r)) => !args.json && !r.faults.is_empty(),
            (None, _) => !args.json,
            (Some(_), Err(_)) => true,
        };
        if to_print {
            print_faults(outcome)?;
        }
    }

    let totals = Totals::of(&outcomes);
    if args.json {
        let doc = document(&outcomes, &totals, elapsed, cpu);
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_summary(&args, &outcomes, &totals, elapsed, cpu)?;
    }
    Ok(if totals.errors > 0 {
        ERROR
    } else if totals.faults > 0 {
        FAULTS
    } else {
        OK
    })
}

/// The keys to trust: the given key files, or the published keys.
async fn trusted_keys(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    files: &[PathBuf],
) -> Result<TrustedKeys> {
    let mut trusted = TrustedKeys::default();
    if files.is_empty() {
        let store = setup::open_bucket(js, &subjects.keys_bucket()).await?;
        trusted = keyring::trust(&keyring::fetch(&store).await?);
    } else {
        for path in files {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading key file {}", path.display()))?;
            let file =
                KeyFile::parse(&text).with_context(|| format!("key file {}", path.display()))?;
            trusted.insert(file.public_key_bytes()?);
        }
    }
    if trusted.is_empty() {
        bail!("no trusted keys: none are published and none were given with --trust");
    }
    Ok(trusted)
}

/// One line per fault on standard output; errors on standard error.
fn print_faults(o: &Outcome) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match (&o.process, &o.result) {
        (None, _) => writeln!(
            out,
            "fault: subject {} names no valid process: its messages belong to no chain",
            o.subject
        )?,
        (Some(p), Ok(report)) => {
            for f in &report.faults {
                writeln!(out, "fault: {p}: {}", fault_line(f))?;
            }
        }
        (Some(p), Err(e)) => eprintln!("turnstile: {p}: could not verify: {e}"),
    }
    out.flush()?;
    Ok(())
}

fn fault_line(f: &Fault) -> String {
    let code = f.kind.code();
    let message = f.kind.to_string();
    // Some messages start with their code already ("replayed: ...").
    let message = message
        .strip_prefix(code)
        .and_then(|m| m.strip_prefix(": "))
        .unwrap_or(&message);
    format!(
        "stream sequence {} (next slot {}): {code}: {message}",
        f.seq, f.slot
    )
}

#[derive(Default)]
struct Totals {
    processes: usize,
    assignments: u64,
    runs: u64,
    faults: usize,
    faulty_processes: usize,
    errors: usize,
}

impl Totals {
    fn of(outcomes: &[Outcome]) -> Totals {
        let mut t = Totals {
            processes: outcomes.len(),
            ..Default::default()
        };
        for o in outcomes {
            match (&o.process, &o.result) {
                (None, _) => {
                    t.faults += 1;
                    t.faulty_processes += 1;
                }
                (Some(_), Ok(r)) => {
                    t.assignments += r.checked;
                    t.runs += r.runs;
                    t.faults += r.faults.len();
                    t.faulty_processes += usize::from(!r.faults.is_empty());
                }
                (Some(_), Err(_)) => t.errors += 1,
            }
        }
        t
    }
}

fn print_summary(
    args: &Args,
    outcomes: &[Outcome],
    t: &Totals,
    elapsed: Duration,
    cpu: Option<f64>,
) -> Result<()> {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let rate = t.assignments as f64 / secs;
    let mut out = std::io::stdout().lock();
    if !args.all {
        // One process: its verdict in one line.
        let Some(o) = outcomes.first() else {
            return Ok(());
        };
        let p = o
            .process
            .as_ref()
            .map_or(o.subject.as_str(), |p| p.as_str());
        match &o.result {
            Ok(r) if r.is_ok() => {
                let range = match r.last_good {
                    Some(l) => format!("slots {}..={l}", args.from),
                    None => "no assignments".into(),
                };
                writeln!(
                    out,
                    "ok: {p} {range} verified ({} assignment{} in {} run{}, {:.2} s, {}/s)",
                    thousands(r.checked),
                    plural(r.checked as usize),
                    thousands(r.runs),
                    plural(r.runs as usize),
                    secs,
                    thousands(rate as u64)
                )?;
            }
            Ok(r) => writeln!(
                out,
                "FAILED: {p}: {} fault{} ({} assignment{} in {} run{} checked)",
                r.faults.len(),
                plural(r.faults.len()),
                thousands(r.checked),
                plural(r.checked as usize),
                thousands(r.runs),
                plural(r.runs as usize)
            )?,
            Err(_) => writeln!(out, "ERROR: {p} could not be verified")?,
        }
        return Ok(());
    }
    let per_core = cpu
        .filter(|c| *c > 0.0)
        .map(|c| {
            format!(
                "; {}/s per core ({:.2} CPU s)",
                thousands((t.assignments as f64 / c) as u64),
                c
            )
        })
        .unwrap_or_default();
    writeln!(
        out,
        "{}: {} process{}, {} assignments in {} runs, {} fault{} in {} process{}, {} error{}; {:.2} s, {} assignments/s{per_core}",
        if t.errors > 0 {
            "ERROR"
        } else if t.faults > 0 {
            "FAILED"
        } else {
            "ok"
        },
        thousands(t.processes as u64),
        if t.processes == 1 { "" } else { "es" },
        thousands(t.assignments),
        thousands(t.runs),
        thousands(t.faults as u64),
        plural(t.faults),
        thousands(t.faulty_processes as u64),
        if t.faulty_processes == 1 { "" } else { "es" },
        t.errors,
        plural(t.errors),
        secs,
        thousands(rate as u64),
    )?;
    Ok(())
}

/// The `--json` document.
fn document(
    outcomes: &[Outcome],
    t: &Totals,
    elapsed: Duration,
    cpu: Option<f64>,
) -> serde_json::Value {
    let processes: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|o| {
            let name = o
                .process
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_default();
            match (&o.process, &o.result) {
                (None, _) => json!({
                    "process": null,
                    "subject": o.subject,
                    "ok": false,
                    "error": "the subject names no valid process",
                }),
                (Some(_), Ok(r)) => json!({
                    "process": name,
                    "subject": o.subject,
                    "ok": r.is_ok(),
                    "checked": r.checked,
                    "runs": r.runs,
                    "messages": r.messages,
                    "last_slot": r.last_good,
                    "tail_seq": r.tail_seq,
                    "faults": r.faults.iter().map(|f| json!({
                        "seq": f.seq,
                        "slot": f.slot,
                        "code": f.kind.code(),
                        "message": f.kind.to_string(),
                    })).collect::<Vec<_>>(),
                }),
                (Some(_), Err(e)) => json!({
                    "process": name,
                    "subject": o.subject,
                    "ok": false,
                    "error": e,
                }),
            }
        })
        .collect();
    let secs = elapsed.as_secs_f64();
    let mut totals = json!({
        "processes": t.processes,
        "assignments": t.assignments,
        "runs": t.runs,
        "faults": t.faults,
        "faulty_processes": t.faulty_processes,
        "errors": t.errors,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "assignments_per_s": (t.assignments as f64 / secs.max(1e-9)).round(),
    });
    if let (Some(c), Some(m)) = (cpu.filter(|c| *c > 0.0), totals.as_object_mut()) {
        m.insert("cpu_seconds".into(), json!((c * 1000.0).round() / 1000.0));
        m.insert(
            "assignments_per_cpu_s".into(),
            json!((t.assignments as f64 / c).round()),
        );
    }
    json!({
        "ok": t.faults == 0 && t.errors == 0,
        "processes": processes,
        "totals": totals,
    })
}

/// Redraws the progress line on standard error.
fn draw(p: &Progress, elapsed: Duration) {
    const WIDTH: usize = 24;
    let expected = p.expected.load(Ordering::Relaxed);
    let assignments = p.assignments.load(Ordering::Relaxed);
    let messages = p.messages.load(Ordering::Relaxed);
    let faults = p.faults.load(Ordering::Relaxed);
    let subjects = p.subjects.load(Ordering::Relaxed);
    let rate = assignments as f64 / elapsed.as_secs_f64().max(1e-3);
    // By messages read of those the read expects.
    let bar = if expected > 0 {
        let fraction = messages as f64 / expected as f64;
        let filled = ((fraction.min(1.0) * WIDTH as f64) as usize).min(WIDTH);
        format!("[{}{}] ", "#".repeat(filled), "-".repeat(WIDTH - filled))
    } else {
        String::new()
    };
    eprint!(
        "\r\x1b[2K{bar}{} process{} · {}/{} messages · {} assignments · {}/s · {} fault{}",
        thousands(subjects),
        if subjects == 1 { "" } else { "es" },
        thousands(messages),
        thousands(expected),
        thousands(assignments),
        thousands(rate as u64),
        thousands(faults),
        plural(faults as usize),
    );
    let _ = std::io::stderr().flush();
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// User + system CPU seconds of this process so far (Linux; none elsewhere).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    // Clock ticks of 1/100 s (USER_HZ on every common platform).
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
