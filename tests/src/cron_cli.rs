//! The `turnstile cron` commands, run as the binary (as a client without credentials)
//! against a private server, a scheduler in the test process and the alarm-loader
//! binary: a job's ticks land in a process's log, `get` and `list` show it, `deactivate`
//! stops it, `delete` removes it; `next --job` reads a stored job's zone and DST policy;
//! the loader's refusals (exit 1, their code on standard error) and usage errors (exit 2).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use protocol::ProcessId;
use scheduler::Config;

use crate::alarms::{now_ms, spawn_loader, wait_for_loaders};
use crate::support::{
    cli_ok as ok, cli_stderr as stderr, connect, read_log, server, show, test_key, turnstile,
    InProcess,
};

/// Runs the CLI and requires exit status 1 (the loader refused) with `code` on
/// standard error and nothing on standard output.
async fn refused(url: &str, args: &[&str], code: &str) -> Result<()> {
    let out = turnstile(url, args).await?;
    assert_eq!(out.status.code(), Some(1), "{args:?}: {}", show(&out));
    assert!(
        stderr(&out).contains(&format!("refused ({code})")),
        "{args:?}: {}",
        show(&out)
    );
    assert!(out.stdout.is_empty(), "{args:?}: {}", show(&out));
    Ok(())
}

/// The tick (ms) of each entry of `process`'s log, read from its message id
/// `alarm-cron-<job>-<tick>-<set_seq>-<tick>-<tag>`; every entry must be a tick of `job`.
async fn ticks_in_log(url: &str, process: &str, job: &str) -> Result<Vec<u64>> {
    let prefix = format!("alarm-cron-{job}-");
    let mut ticks = Vec::new();
    for e in read_log(url, &ProcessId::new(process)?).await? {
        let rest = e
            .message_id
            .strip_prefix(&prefix)
            .with_context(|| format!("not a tick of {job}: {}", e.message_id))?;
        ticks.push(rest.split('-').next().unwrap_or("").parse::<u64>()?);
        assert_eq!(&e.body[..], b"tick", "{}", e.message_id);
        assert!(
            e.headers
                .contains(&("kind".to_string(), "cron".to_string())),
            "{:?}",
            e.headers
        );
    }
    Ok(ticks)
}

/// The `(local, UTC)` fire times of `next` or of the indented lines after `add`.
fn tick_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_job_ticks_into_a_process_until_deactivated() -> Result<()> {
    let server = server()?;
    let url = server.url().to_string();
    let sched = InProcess::start(&server, Config::default(), vec![test_key(71)]).await?;
    let mut loader = spawn_loader(&server)?;
    wait_for_loaders(&connect(&url).await?, 1).await?;

    let added = ok(
        &url,
        &[
            "cron",
            "add",
            "beat",
            "@every 1s",
            "--process",
            "cronned",
            "-d",
            "tick",
            "-H",
            "kind=cron",
        ],
    )
    .await?;
    assert!(added.starts_with("cron job beat added; next:\n"), "{added}");
    // The loader's next five ticks, local (UTC here: +00:00) and UTC.
    let next = tick_lines(&added);
    assert_eq!(next.len(), 5, "{added}");
    assert!(
        next.iter()
            .all(|l| l.contains("+00:00  ") && l.ends_with('Z')),
        "{added}"
    );

    // Ticks land in the log, a second apart.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let ticks = loop {
        let ticks = ticks_in_log(&url, "cronned", "beat").await?;
        if ticks.len() >= 3 {
            break ticks;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("fewer than 3 ticks of beat in the log within 30 s: {ticks:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for w in ticks.windows(2) {
        assert_eq!(w[1] - w[0], 1_000, "{ticks:?}");
    }

    // `get`: the job, the last tick planned (an alarm of its own) and the next ticks.
    let got: Value = serde_json::from_str(&ok(&url, &["cron", "get", "beat", "--json"]).await?)?;
    let planned = got["last_planned_ms"]
        .as_u64()
        .with_context(|| format!("nothing planned: {got}"))?;
    assert!(planned >= ticks[ticks.len() - 1], "{got} {ticks:?}");
    assert_eq!(got["last_planned_alarm"], format!("cron-beat-{planned}"));
    let text = ok(&url, &["cron", "get", "beat"]).await?;
    assert!(text.starts_with("cron job beat (active)\n"), "{text}");
    assert!(text.contains("  schedule @every 1s in UTC\n"), "{text}");
    assert!(text.contains("  target   into process cronned\n"), "{text}");
    assert!(text.contains("  header   kind: cron\n"), "{text}");
    let planned_line = text
        .lines()
        .find(|l| l.starts_with("  planned  up to "))
        .with_context(|| format!("no planned line: {text}"))?;
    assert!(planned_line.contains(": alarm cron-beat-"), "{text}");
    assert_eq!(tick_lines(&text).len(), 5, "{text}");
    // A tick is an alarm: its history is readable as any alarm's.
    let first = format!("cron-beat-{}", ticks[0]);
    let tick: Value = serde_json::from_str(&ok(&url, &["alarm", "get", &first, "--json"]).await?)?;
    assert_eq!(tick["status"]["status"], "done", "{tick}");

    assert_eq!(
        ok(&url, &["cron", "list"]).await?,
        "beat  active  into process cronned  @every 1s in UTC\n"
    );

    assert_eq!(
        ok(&url, &["cron", "deactivate", "beat"]).await?,
        "cron job beat inactive\n"
    );
    let deactivated_at = now_ms();
    let got: Value = serde_json::from_str(&ok(&url, &["cron", "get", "beat", "--json"]).await?)?;
    let planned = got["last_planned_ms"].as_u64().context("planned")?;
    // Let several ticks' times pass; a tick planned before and due after the
    // deactivation is recorded as skipped, not fired.
    while now_ms() < deactivated_at.max(planned) + 3_000 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if planned > deactivated_at {
        let id = format!("cron-beat-{planned}");
        let tick: Value = serde_json::from_str(&ok(&url, &["alarm", "get", &id, "--json"]).await?)?;
        assert_eq!(tick["status"]["status"], "skipped", "{tick}");
    }
    let after = ticks_in_log(&url, "cronned", "beat").await?;
    assert!(after.len() >= ticks.len(), "{after:?}");
    assert!(
        after.iter().all(|&t| t <= deactivated_at),
        "a tick due after the deactivation ({deactivated_at}) fired: {after:?}"
    );
    assert_eq!(
        ok(&url, &["cron", "list"]).await?,
        "beat  inactive  into process cronned  @every 1s in UTC\n"
    );

    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_reads_a_stored_job_and_refusals_exit_1() -> Result<()> {
    let server = server()?;
    let url = server.url().to_string();
    let mut loader = spawn_loader(&server)?;
    wait_for_loaders(&connect(&url).await?, 1).await?;

    // 02:30 in New York does not exist on 2030-03-10 (spring forward); this job skips it.
    let add = [
        "cron",
        "add",
        "nightly",
        "30 2 * * *",
        "--tz",
        "America/New_York",
        "--dst-gap",
        "skip",
        "--subject",
        "jobs.nightly",
        "-d",
        "x",
        "--inactive",
    ];
    let added = ok(&url, &add).await?;
    assert!(
        added.starts_with("cron job nightly added; next:\n"),
        "{added}"
    );
    assert_eq!(tick_lines(&added).len(), 5, "{added}");
    assert!(added.contains("(inactive: none fires until"), "{added}");
    let replaced = ok(&url, &add).await?;
    assert!(
        replaced.starts_with("cron job nightly replaced; next:\n"),
        "{replaced}"
    );

    // 2030-03-09T12:00:00Z.
    let after = "1899288000000";
    let stored = ok(
        &url,
        &[
            "cron",
            "next",
            "--job",
            "nightly",
            "--after-ms",
            after,
            "--count",
            "3",
        ],
    )
    .await?;
    assert_eq!(
        tick_lines(&stored),
        [
            "2030-03-11T02:30:00-04:00  2030-03-11T06:30:00Z",
            "2030-03-12T02:30:00-04:00  2030-03-12T06:30:00Z",
            "2030-03-13T02:30:00-04:00  2030-03-13T06:30:00Z",
        ],
        "{stored}"
    );
    // The same as the expression with the job's zone and policy given by hand.
    let by_hand = [
        "cron",
        "next",
        "30 2 * * *",
        "--tz",
        "America/New_York",
        "--gap",
        "skip",
        "--after-ms",
        after,
        "--count",
        "3",
    ];
    assert_eq!(ok(&url, &by_hand).await?, stored);
    // A job may be named without --job: one word that is no alias.
    let positional = [
        "cron",
        "next",
        "nightly",
        "--after-ms",
        after,
        "--count",
        "3",
    ];
    assert_eq!(ok(&url, &positional).await?, stored);
    // The job's own settings: giving a zone or a policy beside a job is a usage error.
    let out = turnstile(&url, &["cron", "next", "--job", "nightly", "--tz", "UTC"]).await?;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("--tz"), "{}", show(&out));
    let out = turnstile(&url, &["cron", "next", "nightly", "--tz", "Europe/Paris"]).await?;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("--tz"), "{}", show(&out));

    let got = ok(&url, &["cron", "get", "nightly"]).await?;
    assert!(got.starts_with("cron job nightly (inactive)\n"), "{got}");
    assert!(got.contains("  planned  nothing yet\n"), "{got}");
    assert!(got.contains("DST gap skip, fold once"), "{got}");

    assert_eq!(
        ok(&url, &["cron", "delete", "nightly"]).await?,
        "cron job nightly deleted\n"
    );
    for args in [
        &["cron", "get", "nightly"][..],
        &["cron", "delete", "nightly"],
        &["cron", "activate", "nightly"],
        &["cron", "next", "--job", "nightly"],
        &["cron", "next", "nightly"],
    ] {
        refused(&url, args, "not_found").await?;
    }
    assert_eq!(ok(&url, &["cron", "list"]).await?, "");

    refused(
        &url,
        &[
            "cron",
            "add",
            "bad",
            "61 * * * * *",
            "--process",
            "p",
            "-d",
            "x",
        ],
        "invalid_alarm",
    )
    .await?;
    refused(
        &url,
        &[
            "cron",
            "add",
            "bad",
            "@hourly",
            "--tz",
            "Mars/Olympus",
            "--process",
            "p",
            "-d",
            "x",
        ],
        "invalid_alarm",
    )
    .await?;
    // Strategy all sends to <subject>.<instance>: a process target is refused.
    refused(
        &url,
        &[
            "cron",
            "add",
            "bad",
            "@hourly",
            "--all",
            "workers",
            "--process",
            "p",
            "-d",
            "x",
        ],
        "invalid_alarm",
    )
    .await?;
    refused(&url, &["cron", "get", "bad"], "not_found").await?;

    let usage: [(&[&str], &str); 3] = [
        (&["cron", "add", "x", "@hourly", "-d", "x"], "--process"),
        (
            &[
                "cron",
                "add",
                "x",
                "@hourly",
                "--process",
                "p",
                "--overlap",
                "never",
                "-d",
                "x",
            ],
            "--overlap",
        ),
        (&["cron", "next"], "--job"),
    ];
    for (args, expected) in usage {
        let out = turnstile(&url, args).await?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        let err = stderr(&out);
        assert!(
            err.contains("error:") && err.contains(expected),
            "{args:?}: {}",
            show(&out)
        );
    }

    loader.terminate(Duration::from_secs(10));
    Ok(())
}
