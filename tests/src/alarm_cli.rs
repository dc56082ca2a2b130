//! The `turnstile alarm` commands, run as the binary (as a client without
//! credentials) against a private server, a scheduler in the test process and the
//! alarm-loader binary: set, get, list and cancel; the loader's refusals (exit 1,
//! their code on standard error) and usage errors (exit 2, nothing sent).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use protocol::ProcessId;
use scheduler::Config;

use crate::alarms::{spawn_loader, wait_for_loaders};
use crate::support::{
    cli_ok as ok, cli_stderr as stderr, connect, read_log, server, show, test_key, turnstile,
    InProcess,
};

/// The ids of a `list --json` answer, in its order.
fn ids(listed: &str) -> Result<Vec<String>> {
    let v: Value = serde_json::from_str(listed)?;
    Ok(v["alarms"]
        .as_array()
        .context("list answers an array of alarms")?
        .iter()
        .filter_map(|a| a["id"].as_str().map(str::to_string))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_set_in_one_second_is_done_and_its_slot_is_in_the_log() -> Result<()> {
    let server = server()?;
    let url = server.url().to_string();
    let sched = InProcess::start(&server, Config::default(), vec![test_key(61)]).await?;
    let mut loader = spawn_loader(&server)?;
    wait_for_loaders(&connect(&url).await?, 1).await?;

    let set = ok(
        &url,
        &[
            "alarm",
            "set",
            "wake-1",
            "--in",
            "1s",
            "--process",
            "alarmed",
            "-d",
            "wake up",
            "-H",
            "kind=test",
        ],
    )
    .await?;
    assert!(set.starts_with("alarm wake-1 set: due "), "{set}");
    assert!(set.contains("into process alarmed"), "{set}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let got = loop {
        let got: Value =
            serde_json::from_str(&ok(&url, &["alarm", "get", "wake-1", "--json"]).await?)?;
        if got["status"]["status"] == "done" {
            break got;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("wake-1 not done within 30 s: {got}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let slot = got["status"]["slot"]
        .as_u64()
        .context("a done process alarm names its slot")?;
    let log = read_log(&url, &ProcessId::new("alarmed")?).await?;
    let entry = log
        .iter()
        .find(|e| e.slot == slot)
        .with_context(|| format!("slot {slot} is not in the log: {log:?}"))?;
    assert_eq!(&entry.body[..], b"wake up");
    assert!(
        entry
            .headers
            .contains(&("kind".to_string(), "test".to_string())),
        "{:?}",
        entry.headers
    );
    assert!(
        entry.message_id.starts_with("alarm-wake-1-"),
        "{}",
        entry.message_id
    );
    assert_eq!(log.len(), 1, "fired once");

    // The readable form: the status with its slot, one line per event with its time.
    let text = ok(&url, &["alarm", "get", "wake-1"]).await?;
    assert!(text.contains("  target   into process alarmed\n"), "{text}");
    assert!(text.contains("  body     7 bytes: \"wake up\"\n"), "{text}");
    assert!(text.contains("  header   kind: test\n"), "{text}");
    let status = text
        .lines()
        .find(|l| l.starts_with("  status   "))
        .with_context(|| format!("no status line: {text}"))?;
    assert!(
        status.contains("done at ") && status.ends_with(&format!(", slot {slot}")),
        "{status}"
    );
    let history: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "history")
        .skip(1)
        .collect();
    assert_eq!(history.len(), 3, "{text}");
    for (line, event) in history
        .iter()
        .zip(["set", "attempt 1 by ", "delivered (attempt 1, "])
    {
        // `<seq>  <RFC 3339 UTC>  <event>`
        let mut parts = line.split_whitespace();
        assert!(
            parts.next().is_some_and(|seq| seq.parse::<u64>().is_ok()),
            "{line}"
        );
        let time = parts.next().context("a time")?;
        assert!(time.ends_with('Z') && time.contains('T'), "{line}");
        assert!(line.contains(&format!("{time}  {event}")), "{line}");
    }
    assert!(
        history[2].ends_with(&format!("slot {slot})")),
        "{}",
        history[2]
    );

    loader.terminate(Duration::from_secs(10));
    sched.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_pending_alarms_by_target_and_not_cancelled_ones() -> Result<()> {
    let server = server()?;
    let url = server.url().to_string();
    let mut loader = spawn_loader(&server)?;
    wait_for_loaders(&connect(&url).await?, 1).await?;

    for (id, target) in [
        ("keep", ["--process", "p"]),
        ("drop", ["--process", "p"]),
        ("call", ["--subject", "jobs.work"]),
    ] {
        let mut args = vec!["alarm", "set", id, "--in", "10m", "-d", "x"];
        args.extend(target);
        ok(&url, &args).await?;
    }
    assert_eq!(
        ok(&url, &["alarm", "cancel", "drop"]).await?,
        "alarm drop cancelled\n"
    );
    let again = ok(&url, &["alarm", "cancel", "drop"]).await?;
    assert!(
        again.starts_with("alarm drop not cancelled: already cancelled at "),
        "{again}"
    );

    let mut all = ids(&ok(&url, &["alarm", "list", "--json"]).await?)?;
    all.sort();
    assert_eq!(all, ["call", "keep"]);
    assert_eq!(
        ids(&ok(&url, &["alarm", "list", "--process", "p", "--json"]).await?)?,
        ["keep"]
    );
    assert_eq!(
        ids(&ok(&url, &["alarm", "list", "--subject", "jobs.work", "--json"]).await?)?,
        ["call"]
    );
    // A range that ends before they are due holds none of them.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let to = (now + 60_000).to_string();
    assert!(ids(&ok(&url, &["alarm", "list", "--to", &to, "--json"]).await?)?.is_empty());

    let text = ok(&url, &["alarm", "list", "--process", "p"]).await?;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].ends_with("  keep  into process p  pending"),
        "{text}"
    );

    loader.terminate(Duration::from_secs(10));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_exit_1_with_their_code_and_usage_errors_exit_2() -> Result<()> {
    let server = server()?;
    let url = server.url().to_string();
    let mut loader = spawn_loader(&server)?;
    wait_for_loaders(&connect(&url).await?, 1).await?;

    let refused: [(&[&str], &str); 4] = [
        (&["alarm", "cancel", "nope"], "refused (not_found): "),
        (&["alarm", "get", "nope"], "refused (not_found): "),
        (
            &[
                "alarm",
                "set",
                "a.b",
                "--in",
                "1m",
                "--process",
                "p",
                "-d",
                "x",
            ],
            "refused (invalid_alarm): id",
        ),
        (
            &["alarm", "list", "--from", "0", "--to", "90000000"],
            "refused (invalid_range): ",
        ),
    ];
    for (args, expected) in refused {
        let out = turnstile(&url, args).await?;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", show(&out));
        assert!(stderr(&out).contains(expected), "{args:?}: {}", show(&out));
        assert!(out.stdout.is_empty(), "{args:?}: {}", show(&out));
    }

    let usage: [(&[&str], &str); 4] = [
        (
            &[
                "alarm",
                "set",
                "x",
                "--at",
                "tomorrow",
                "--process",
                "p",
                "-d",
                "x",
            ],
            "RFC 3339",
        ),
        (
            &[
                "alarm",
                "set",
                "x",
                "--at",
                "2030-01-31T09:00:00",
                "--process",
                "p",
                "-d",
                "x",
            ],
            "RFC 3339",
        ),
        (
            &[
                "alarm",
                "set",
                "x",
                "--in",
                "5 minutes",
                "--process",
                "p",
                "-d",
                "x",
            ],
            "duration",
        ),
        (&["alarm", "set", "x", "--in", "5m", "-d", "x"], "--process"),
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
    // Nothing was sent.
    let out = turnstile(&url, &["alarm", "get", "x"]).await?;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stderr(&out).contains("refused (not_found)"),
        "{}",
        show(&out)
    );

    loader.terminate(Duration::from_secs(10));
    Ok(())
}
