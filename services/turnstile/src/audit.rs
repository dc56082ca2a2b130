//! `turnstile audit --follow`: the live feed of fault events that schedulers (and other
//! verifiers) publish on `<prefix>.events.fault` when they find a fault in a log.

use std::io::Write;

use anyhow::{bail, Result};
use futures::StreamExt;

use journal::subjects::Subjects;
use protocol::wire::FaultEvent;

/// `turnstile audit`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
The feed is live only: fault events are published on <prefix>.events.fault when a \
fault is found and are not stored anywhere, so `audit` shows those that happen while \
it follows, and nothing from before. To check what the log holds now, run \
`turnstile verify --all`.")]
pub struct Args {
    /// Subscribe and print each fault event as it comes, until interrupted (required:
    /// there is nothing to show without it, see below).
    #[arg(long)]
    follow: bool,
    /// Print each event as its raw JSON, one a line.
    #[arg(long)]
    json: bool,
}

impl Args {
    /// Refuses what cannot work before connecting.
    pub fn check(&self) -> Result<()> {
        if !self.follow {
            bail!(
                "audit is a live feed: use `turnstile audit --follow` (fault events are not \
                 stored; `turnstile verify --all` checks the whole log)"
            );
        }
        Ok(())
    }
}

/// Follows the fault events until interrupted; returns the exit status.
pub async fn run(client: async_nats::Client, subjects: Subjects, args: Args) -> Result<i32> {
    args.check()?;
    let subject = subjects.fault_events();
    let mut events = client.subscribe(subject.clone()).await?;
    client.flush().await?;
    eprintln!("turnstile: following fault events on {subject} (Ctrl-C to stop)");
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let msg = tokio::select! {
            m = events.next() => m,
            _ = &mut interrupted => return Ok(0),
        };
        let Some(msg) = msg else {
            bail!("the subscription to {subject} ended");
        };
        let mut out = std::io::stdout().lock();
        if args.json {
            match serde_json::from_slice::<serde_json::Value>(&msg.payload) {
                // The raw event, as published, when it is one line of JSON.
                Ok(_) if !msg.payload.contains(&b'\n') => {
                    out.write_all(&msg.payload)?;
                    out.write_all(b"\n")?;
                }
                Ok(v) => writeln!(out, "{}", serde_json::to_string(&v)?)?,
                Err(e) => {
                    eprintln!("turnstile: skipping a message on {subject} that is not JSON: {e}")
                }
            }
        } else {
            match serde_json::from_slice::<FaultEvent>(&msg.payload) {
                Ok(e) => writeln!(out, "{}", line(&e))?,
                Err(e) => {
                    eprintln!(
                        "turnstile: skipping a message on {subject} that is not a fault event: {e}"
                    )
                }
            }
        }
        out.flush()?;
    }
}

/// One event as a line: time, process, stream sequence, slot, code, message.
fn line(e: &FaultEvent) -> String {
    format!(
        "{} {} seq {} slot {} {}: {} (found by {})",
        rfc3339(e.time_ms),
        e.process,
        e.seq,
        e.slot,
        e.code,
        e.message,
        e.detected_by
    )
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC): how every command
/// prints an instant.
pub(crate) fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }
}
