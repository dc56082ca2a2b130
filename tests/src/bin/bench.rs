//! `make bench`: turnstile's performance, measured against a ceiling taken in the
//! same run on the same machine (machines here are shared and noisy: compare the
//! ratios, not the absolute figures).
//!
//! For each storage setting (default `sync_interval`, and `sync_interval: always`):
//! 1. the raw ceiling: pipelined JetStream publishes of 300-byte messages spread over
//!    1,000 subjects, no scheduler; and the request/reply ceiling: the same load as
//!    below against a responder that answers at once (what any per-message
//!    request/reply service could reach here);
//! 2. one hot process: closed-loop requests from several connections;
//! 3. 1,000 processes together, same load spread evenly;
//! 4. latency p50/p99 of both at half of the peak each reached, open loop; 1,000
//!    requests at once with 256-byte ids to one process; (`sync_interval: always`
//!    only) overload: twice the 1,000-process peak offered for 10 s, every answer counted;
//! 5. (default storage only) reading the log: `journal::audit::verify` over one
//!    process of 100,000 assignments written through the scheduler (assignments/s,
//!    and per core of this process's CPU time), and cold head loads
//!    (`journal::chain::load_head`) of 1,000 processes of a few runs each,
//!    sequentially and 32 at once; and `verify --all` over a log of 1,000 processes
//!    (its own server, `--only-verify-all`): one read of the stream against the raw
//!    read ceiling (the same pull consumer, nothing judged) and against the old way
//!    (a consumer per process), plus the CLI.
//!
//! 6. the alarm-loader: alarms set through the NATS API per second (pipelined, vs the
//!    raw ceiling), lateness p50/p99/max of 1,000 and of 10,000 alarms a second for
//!    10 s into 1,000 processes (each on a loader started afresh), and how long after their second 100,000 alarms due in it have all
//!    fired.
//!
//! The scheduler and the alarm-loader run as their own processes (release build), as
//! in production.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::Semaphore;

use harness::{NatsServer, Options, Role};

#[derive(Parser, Debug)]
struct Args {
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/bench.json")]
    out: String,
    /// Seconds each throughput phase measures (after a warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Requests in flight across all connections (closed loop).
    #[arg(long, default_value_t = 8192)]
    window: usize,
    /// Only the default storage setting (skip sync_interval: always).
    #[arg(long, conflicts_with = "only_sync_always")]
    quick: bool,
    /// Only `sync_interval: always` (skip the default storage setting).
    #[arg(long)]
    only_sync_always: bool,
    /// The scheduler's `--singles-in-flight` under the default `sync_interval`.
    #[arg(long, default_value_t = 256)]
    singles_default: usize,
    /// The scheduler's `--singles-in-flight` under `sync_interval: always` (the
    /// setting deploy/ recommends for such a server).
    #[arg(long, default_value_t = 16)]
    singles_sync_always: usize,
    /// Profiling aid: only the closed loop over this many processes.
    #[arg(long)]
    closed_processes: Option<usize>,
    /// Profiling aid: only run 1,000 processes open-loop at this rate for `seconds`.
    #[arg(long)]
    open_rate: Option<f64>,
    /// Only the log-reading phases (verify throughput, cold head loads) on the
    /// default storage setting.
    #[arg(long)]
    only_log_reads: bool,
    /// Only phase 5's `verify --all` comparison (its own server: raw read ceiling,
    /// one read of the stream, per-process reads, the CLI).
    #[arg(long)]
    only_verify_all: bool,
    /// Only the alarm-loader's section.
    #[arg(long)]
    only_alarms: bool,
    /// Profiling aid: only the queue-keys phases (on the default storage setting
    /// unless --only-sync-always).
    #[arg(long)]
    only_queue_keys: bool,
    /// Skip the alarm-loader's section.
    #[arg(long)]
    no_alarms: bool,
    /// Only the workers' section.
    #[arg(long)]
    only_workers: bool,
    /// Skip the workers' section.
    #[arg(long)]
    no_workers: bool,
    /// Profiling aid: in the alarm-loader's section, skip the capacity phase.
    #[arg(long)]
    no_alarm_capacity: bool,
    /// The alarm-loader's capacity phase: how many alarms pending in each round (due in
    /// 1–2 h, each round adding to the one before). 10,000,000 is the issue's target:
    /// about 10 minutes of sets and 4 GB of store on this kind of machine.
    #[arg(long, value_delimiter = ',', default_values_t = [100_000usize, 1_000_000])]
    alarm_capacity: Vec<usize>,
    /// Profiling aid: in the alarm-loader's section, stop after the set phase.
    #[arg(long, hide = true)]
    only_alarm_set: bool,
    /// Internal: serve as the echo responder at this NATS URL (the request/reply
    /// transport ceiling: replies at once with a receipt-sized payload).
    #[arg(long, hide = true)]
    serve_echo: Option<String>,
}

const BODY: usize = 300;
const PROCESSES: usize = 1000;
const CONNECTIONS: usize = 4;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.serve_echo {
        return serve_echo(url).await;
    }
    let body = Bytes::from(vec![b'x'; BODY]);
    if args.only_log_reads {
        return log_reads_only(&body).await;
    }
    if args.only_verify_all {
        let v = verify_all_section(&body).await?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        print_verify_all_table(&v);
        return Ok(());
    }
    if args.only_workers {
        let w = workers_section(&body, args.seconds, args.window).await?;
        println!("{}", serde_json::to_string_pretty(&w)?);
        print_workers_table(&w);
        return Ok(());
    }
    if args.only_alarms {
        let a = alarms_section(
            &body,
            args.seconds,
            if args.no_alarm_capacity {
                &[]
            } else {
                &args.alarm_capacity
            },
            args.only_alarm_set,
        )
        .await?;
        println!("{}", serde_json::to_string_pretty(&a)?);
        print_alarms_table(&a);
        return Ok(());
    }
    let mut runs = Vec::new();
    let settings: &[bool] = match (args.quick, args.only_sync_always) {
        (true, _) => &[false],
        (_, true) => &[true],
        _ => &[false, true],
    };
    for &sync_always in settings {
        let label = if sync_always {
            "sync_interval: always"
        } else {
            "default sync"
        };
        eprintln!("== {label}");
        let server = NatsServer::start_with(Options {
            sync_always,
            ..Options::default()
        })?;
        // The raw ceiling makes a stream of its own: the operator's right.
        let raw = raw_ceiling(&server.url_as(Role::Operator), &body, args.seconds).await?;
        eprintln!("raw JetStream pipelined publish, {PROCESSES} subjects: {raw:.0} msg/s");

        // The request/reply ceiling: the same load against a responder that does nothing.
        let echo = {
            let mut cmd = std::process::Command::new(std::env::current_exe()?);
            // The echo answers as the scheduler's intake does (replies only).
            cmd.arg("--serve-echo")
                .arg(server.url_as(Role::SchedulerIntake));
            let mut p = harness::Process::spawn(cmd)?;
            let conns = connect_all(server.url()).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let meter = CpuMeter::new(&[("nats", server.pid()), ("echo", p.pid())]);
            let (before, t0) = (meter.sample(), Instant::now());
            let t = closed_loop(&conns, &body, PROCESSES, args.window, args.seconds).await?;
            let cpu = meter.usage(&before, t0.elapsed(), t.rate);
            p.kill();
            (t.rate, cpu)
        };
        let (echo, echo_cpu) = echo;
        eprintln!(
            "request/reply echo ceiling, {PROCESSES} subjects: {echo:.0} msg/s; cpu {echo_cpu}"
        );

        let dir = tempfile::tempdir()?;
        let key = protocol::keys::Keypair::generate();
        let key_path = dir.path().join("key.json");
        std::fs::write(&key_path, key.to_key_file())?;
        let bin = harness::workspace_bin("scheduler")?;
        let mut cmd = std::process::Command::new(bin);
        let singles = if sync_always {
            args.singles_sync_always
        } else {
            args.singles_default
        };
        cmd.arg("--key")
            .arg(&key_path)
            .arg("--singles-in-flight")
            .arg(singles.to_string())
            .env("NATS_URL", server.url_as(Role::Scheduler))
            .env("TS_INTAKE_URL", server.url_as(Role::SchedulerIntake))
            .env("TS_REPLIES_URL", server.url_as(Role::SchedulerReplies))
            .env(
                "RUST_LOG",
                std::env::var("BENCH_SCHEDULER_LOG").unwrap_or_else(|_| "warn".into()),
            );
        let scheduler = harness::Process::spawn(cmd)?;
        let meter = CpuMeter::new(&[("nats", server.pid()), ("scheduler", scheduler.pid())]);
        let probe = async_nats::connect(server.url()).await?;
        tests::support::wait_for_schedulers(&probe, 1).await?;

        let conns = connect_all(server.url()).await?;
        if let Some(n) = args.closed_processes {
            let t = closed_loop(&conns, &body, n, args.window, args.seconds).await?;
            println!(
                "closed loop over {n} processes, window {}: {:.0}/s",
                args.window, t.rate
            );
            println!("writer: {}", writer_stats(&probe).await);
            return Ok(());
        }
        if args.only_queue_keys {
            let q = queue_keys_section(&conns, &body, args.window, args.seconds).await?;
            let doc = json!({"runs": [{"storage": label, "queue_keys": q}]});
            println!("{}", serde_json::to_string_pretty(&doc)?);
            print_queue_keys_table(&doc);
            return Ok(());
        }
        if let Some(rate) = args.open_rate {
            let l = open_loop(&conns, &body, PROCESSES, rate, args.seconds).await?;
            println!("open loop {rate}/s over {PROCESSES} processes: p50 {:.2} ms, p99 {:.2} ms, achieved {:.0}/s", l.p50_ms, l.p99_ms, l.achieved);
            println!("writer: {}", writer_stats(&probe).await);
            return Ok(());
        }
        let (before, t0) = (meter.sample(), Instant::now());
        let hot = closed_loop(&conns, &body, 1, args.window, args.seconds).await?;
        let hot_cpu = meter.usage(&before, t0.elapsed(), hot.rate);
        eprintln!(
            "one hot process: {:.0} assignments/s; cpu {hot_cpu}",
            hot.rate
        );
        let (before, t0) = (meter.sample(), Instant::now());
        let many = closed_loop(&conns, &body, PROCESSES, args.window, args.seconds).await?;
        let many_cpu = meter.usage(&before, t0.elapsed(), many.rate);
        eprintln!(
            "{PROCESSES} processes: {:.0} assignments/s ({:.2} of raw); cpu {many_cpu}",
            many.rate,
            many.rate / raw
        );
        let hot_lat = open_loop(&conns, &body, 1, hot.rate / 2.0, args.seconds.min(4.0)).await?;
        eprintln!(
            "hot process at {:.0}/s: p50 {:.2} ms, p99 {:.2} ms",
            hot.rate / 2.0,
            hot_lat.p50_ms,
            hot_lat.p99_ms
        );
        let many_lat = open_loop(
            &conns,
            &body,
            PROCESSES,
            many.rate / 2.0,
            args.seconds.min(4.0),
        )
        .await?;
        eprintln!(
            "{PROCESSES} processes at {:.0}/s: p50 {:.2} ms, p99 {:.2} ms",
            many.rate / 2.0,
            many_lat.p50_ms,
            many_lat.p99_ms
        );
        let burst = id_burst(&conns, &body).await?;
        eprintln!("1,000 requests at once, 256-byte ids, one process: {burst}");
        let queue_keys = queue_keys_section(&conns, &body, args.window, args.seconds).await?;
        eprintln!("queue keys: {queue_keys}");
        // Overload: twice the peak this run measured, offered for 10 s to 1,000
        // processes; every request must be answered (a receipt or `busy`).
        let overload = if sync_always {
            let rate = 2.0 * many.rate;
            let (answers, _) = offer(&conns, &body, PROCESSES, rate, 0.0, 10.0).await?;
            let mut v = summarise(&answers);
            v["offered_per_s"] = json!(rate.round());
            v["scheduler_slow_consumer_drops"] =
                scheduler_stat(&probe, "slow_consumer_drops").await;
            v["client_slow_consumer_drops"] = json!(conns
                .iter()
                .map(|c| c.statistics().dropped_messages.load(Ordering::Relaxed))
                .sum::<u64>());
            eprintln!("overload at {rate:.0}/s for 10 s, 1,000 processes: {v}");
            v
        } else {
            serde_json::Value::Null
        };
        let log_reads = if sync_always {
            serde_json::Value::Null
        } else {
            log_reads(&server, &conns, &body, &key).await?
        };
        runs.push(json!({
            "storage": label,
            "log_reads": log_reads,
            "id_burst_1000x256": burst,
            "queue_keys": queue_keys,
            "overload_2x_peak_10s": overload,
            "scheduler_singles_in_flight": singles,
            "raw_ceiling_msgs_per_s": raw.round(),
            "echo_ceiling_msgs_per_s": echo.round(),
            "processes_1000_vs_echo": (many.rate / echo * 1000.0).round() / 1000.0,
            "hot_process_assignments_per_s": hot.rate.round(),
            "hot_process_errors": hot.errors,
            "processes_1000_assignments_per_s": many.rate.round(),
            "processes_1000_errors": many.errors,
            "processes_1000_vs_raw": (many.rate / raw * 1000.0).round() / 1000.0,
            "cpu": {"echo": echo_cpu, "hot_process": hot_cpu, "processes_1000": many_cpu},
            "hot_latency_at_half_peak": {"rate": (hot.rate / 2.0).round(), "p50_ms": hot_lat.p50_ms, "p99_ms": hot_lat.p99_ms, "achieved": hot_lat.achieved.round()},
            "processes_1000_latency_at_half_peak": {"rate": (many.rate / 2.0).round(), "p50_ms": many_lat.p50_ms, "p99_ms": many_lat.p99_ms, "achieved": many_lat.achieved.round()},
            "targets": {"hot_process_min": 50000, "processes_1000_vs_raw_min": 0.8},
            "hot_process_meets_target": hot.rate >= 50000.0,
            "processes_1000_meets_target": many.rate >= 0.8 * raw,
        }));
    }
    let alarms = if args.no_alarms || args.closed_processes.is_some() || args.open_rate.is_some() {
        serde_json::Value::Null
    } else {
        eprintln!("== alarm-loader");
        alarms_section(&body, args.seconds, &args.alarm_capacity, false).await?
    };
    let workers = if args.no_workers || args.closed_processes.is_some() || args.open_rate.is_some()
    {
        serde_json::Value::Null
    } else {
        eprintln!("== workers");
        workers_section(&body, args.seconds, args.window).await?
    };
    let doc = json!({
        "alarms": alarms,
        "workers": workers,
        "body_bytes": BODY,
        "connections": CONNECTIONS,
        "window": args.window,
        "seconds_per_phase": args.seconds,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "runs": runs,
    });
    if let Some(parent) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)?)?;
    print_table(&doc);
    print_queue_keys_table(&doc);
    print_log_reads_table(&doc);
    print_alarms_table(&doc["alarms"]);
    print_workers_table(&doc["workers"]);
    println!("\nwrote {}", args.out);
    Ok(())
}

fn print_table(doc: &serde_json::Value) {
    println!();
    println!("| storage | raw ceiling msg/s | echo ceiling msg/s | hot process /s | 1000 processes /s | 1000 vs raw | 1000 vs echo | hot p50/p99 ms @½ | 1000 p50/p99 ms @½ |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in doc["runs"].as_array().into_iter().flatten() {
        println!(
            "| {} | {} | {} | {} {} | {} | {} {} | {} | {:.2} / {:.2} | {:.2} / {:.2} |",
            r["storage"].as_str().unwrap_or(""),
            r["raw_ceiling_msgs_per_s"],
            r["echo_ceiling_msgs_per_s"],
            r["hot_process_assignments_per_s"],
            if r["hot_process_meets_target"].as_bool() == Some(true) {
                "✓"
            } else {
                "✗ (<50k)"
            },
            r["processes_1000_assignments_per_s"],
            r["processes_1000_vs_raw"],
            if r["processes_1000_meets_target"].as_bool() == Some(true) {
                "✓"
            } else {
                "✗ (<0.8)"
            },
            r["processes_1000_vs_echo"],
            r["hot_latency_at_half_peak"]["p50_ms"]
                .as_f64()
                .unwrap_or(0.0),
            r["hot_latency_at_half_peak"]["p99_ms"]
                .as_f64()
                .unwrap_or(0.0),
            r["processes_1000_latency_at_half_peak"]["p50_ms"]
                .as_f64()
                .unwrap_or(0.0),
            r["processes_1000_latency_at_half_peak"]["p99_ms"]
                .as_f64()
                .unwrap_or(0.0),
        );
    }
    // The scheduler's word under bursts and overload: every request answered.
    println!();
    println!("| storage | phase | offered | receipts | busy | other refusals | unanswered | answer p50 / p99 / max ms | slow-consumer drops (scheduler / client) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in doc["runs"].as_array().into_iter().flatten() {
        for (phase, key) in [
            ("1,000 at once, 256 B ids, 1 process", "id_burst_1000x256"),
            ("2× peak for 10 s, 1,000 processes", "overload_2x_peak_10s"),
        ] {
            let v = &r[key];
            if v.is_null() {
                continue;
            }
            let outcomes = v["outcomes"].as_object().cloned().unwrap_or_default();
            let count = |k: &str| outcomes.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            let other: u64 = outcomes
                .iter()
                .filter(|(k, _)| !["receipt", "busy", "no_answer"].contains(&k.as_str()))
                .filter_map(|(_, x)| x.as_u64())
                .sum();
            let offered = if v["offered_per_s"].is_null() {
                format!("{}", v["requests"])
            } else {
                format!("{} ({}/s)", v["requests"], v["offered_per_s"])
            };
            println!(
                "| {} | {phase} | {offered} | {} | {} | {other} | {} | {} / {} / {} | {} / {} |",
                r["storage"].as_str().unwrap_or(""),
                count("receipt"),
                count("busy"),
                v["unanswered"],
                v["answer_p50_ms"],
                v["answer_p99_ms"],
                v["answer_max_ms"],
                v["scheduler_slow_consumer_drops"],
                v["client_slow_consumer_drops"],
            );
        }
    }
    // Where the two cores went: a request/reply service shares them with NATS and
    // the load generator, so this bounds what any scheduler could reach here.
    println!();
    println!("| storage | phase | ops/s | scheduler (or echo) cores | nats-server cores | client cores | total cores | CPU µs per op |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in doc["runs"].as_array().into_iter().flatten() {
        for (phase, rate_key) in [
            ("echo", "echo_ceiling_msgs_per_s"),
            ("hot_process", "hot_process_assignments_per_s"),
            ("processes_1000", "processes_1000_assignments_per_s"),
        ] {
            let c = &r["cpu"][phase];
            let service = if c["scheduler_cores"].is_null() {
                &c["echo_cores"]
            } else {
                &c["scheduler_cores"]
            };
            println!(
                "| {} | {phase} | {} | {service} | {} | {} | {} | {} |",
                r["storage"].as_str().unwrap_or(""),
                r[rate_key],
                c["nats_cores"],
                c["client_cores"],
                c["total_cores"],
                c["cpu_us_per_op"],
            );
        }
    }
}

/// Pipelined JetStream publishes (acks awaited, a bounded number in flight) over
/// `PROCESSES` subjects of a stream shaped like the log.
async fn raw_ceiling(url: &str, body: &Bytes, seconds: f64) -> Result<f64> {
    let js = async_nats::jetstream::new(tests::support::connect(url).await?);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH_RAW".into(),
        subjects: vec!["bench.raw.*".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let subjects: Vec<String> = (0..PROCESSES).map(|i| format!("bench.raw.p{i}")).collect();
    let run = |dur: Duration| {
        let js = js.clone();
        let subjects = subjects.clone();
        let body = body.clone();
        async move {
            let started = Instant::now();
            let mut acks = futures::stream::FuturesUnordered::new();
            let mut done = 0u64;
            let mut i = 0usize;
            while started.elapsed() < dur {
                while acks.len() < 4096 {
                    let ack = js
                        .publish(subjects[i % subjects.len()].clone(), body.clone())
                        .await?;
                    acks.push(std::future::IntoFuture::into_future(ack));
                    i += 1;
                }
                if let Some(a) = acks.next().await {
                    a?;
                    done += 1;
                }
            }
            while let Some(a) = acks.next().await {
                a?;
                done += 1;
            }
            Ok::<f64, anyhow::Error>(done as f64 / started.elapsed().as_secs_f64())
        }
    };
    run(Duration::from_millis(500)).await?;
    run(Duration::from_secs_f64(seconds)).await
}

async fn connect_all(url: &str) -> Result<Vec<async_nats::Client>> {
    let mut v = Vec::new();
    for _ in 0..CONNECTIONS {
        v.push(
            async_nats::ConnectOptions::new()
                .client_capacity(65_536)
                .subscription_capacity(1 << 20)
                .connect(url)
                .await?,
        );
    }
    Ok(v)
}

/// Replies are routed by inbox suffix to the waiting sender.
struct Inbox {
    prefix: String,
    pending: Pending,
}

/// How a request ended: its latency and its answer (`Err(code)`: a typed refusal,
/// `no_answer` when none came within 30 s).
type Answer = (Duration, Result<(), String>);

/// Requests in flight: send time and where to deliver the answer.
type Pending = Arc<Mutex<HashMap<u64, (Instant, tokio::sync::oneshot::Sender<Answer>)>>>;

async fn inbox(client: &async_nats::Client) -> Result<Inbox> {
    // Under _INBOX: the only reply subjects a client without credentials may subscribe to.
    let prefix = format!("_INBOX.bench-{}", uuid_like());
    let mut sub = client.subscribe(format!("{prefix}.*")).await?;
    let pending: Pending = Arc::default();
    let p = Arc::clone(&pending);
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(n) = msg
                .subject
                .rsplit('.')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let ok = match msg.headers.as_ref().and_then(|h| h.get("Ts-Error")) {
                None => Ok(()),
                Some(code) => Err(code.to_string()),
            };
            let entry = p.lock().ok().and_then(|mut m| m.remove(&n));
            if let Some((sent, tx)) = entry {
                let _ = tx.send((sent.elapsed(), ok));
            }
        }
    });
    Ok(Inbox { prefix, pending })
}

fn uuid_like() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

struct Throughput {
    rate: f64,
    errors: u64,
}

/// CPU time of the processes that share the machine during a phase (the client is
/// this process), from `/proc/<pid>/stat`: where a phase's two cores go.
struct CpuMeter {
    procs: Vec<(&'static str, String)>,
}

impl CpuMeter {
    fn new(procs: &[(&'static str, Option<u32>)]) -> CpuMeter {
        let mut v: Vec<(&'static str, String)> = procs
            .iter()
            .filter_map(|(n, p)| p.map(|p| (*n, p.to_string())))
            .collect();
        v.push(("client", "self".into()));
        CpuMeter { procs: v }
    }

    /// User + system seconds of each process so far.
    fn sample(&self) -> Vec<f64> {
        self.procs.iter().map(|(_, pid)| cpu_seconds(pid)).collect()
    }

    /// Cores each process used since `before`, over `wall`, and the CPU µs all of
    /// them spent per operation at `rate` operations a second.
    fn usage(&self, before: &[f64], wall: Duration, rate: f64) -> serde_json::Value {
        let now = self.sample();
        let wall = wall.as_secs_f64().max(1e-9);
        let mut m = serde_json::Map::new();
        let mut total = 0.0;
        for ((name, _), (a, b)) in self.procs.iter().zip(before.iter().zip(&now)) {
            let cores = (b - a) / wall;
            total += cores;
            m.insert(
                format!("{name}_cores"),
                json!((cores * 100.0).round() / 100.0),
            );
        }
        m.insert("total_cores".into(), json!((total * 100.0).round() / 100.0));
        if rate > 0.0 {
            m.insert(
                "cpu_us_per_op".into(),
                json!((total / rate * 1e7).round() / 10.0),
            );
        }
        m.into()
    }
}

/// User + system CPU seconds of `pid` ("self" for this process); 0 when unreadable.
/// Linux reports them in clock ticks of 1/100 s (USER_HZ on every common platform).
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Sends one request; resolves with its latency and its answer.
async fn send(
    client: &async_nats::Client,
    inbox: &Inbox,
    n: u64,
    subject: String,
    body: Bytes,
) -> Result<Answer> {
    send_with(client, inbox, n, subject, None, body).await
}

/// [`send`] with headers.
async fn send_with(
    client: &async_nats::Client,
    inbox: &Inbox,
    n: u64,
    subject: String,
    headers: Option<async_nats::HeaderMap>,
    body: Bytes,
) -> Result<Answer> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if let Ok(mut m) = inbox.pending.lock() {
        m.insert(n, (Instant::now(), tx));
    }
    let reply = format!("{}.{n}", inbox.prefix);
    match headers {
        Some(h) => {
            client
                .publish_with_reply_and_headers(subject, reply, h, body)
                .await?
        }
        None => client.publish_with_reply(subject, reply, body).await?,
    }
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(r)) => Ok(r),
        _ => Ok((Duration::from_secs(30), Err("no_answer".into()))),
    }
}

/// Closed loop: `window` requests always in flight, spread over the connections,
/// for a warm-up then `seconds`; returns completed assignments per second.
async fn closed_loop(
    conns: &[async_nats::Client],
    body: &Bytes,
    processes: usize,
    window: usize,
    seconds: f64,
) -> Result<Throughput> {
    let warmup = Duration::from_millis(1000);
    let total = warmup + Duration::from_secs_f64(seconds);
    let counted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tag = uuid_like();
    let mut tasks = Vec::new();
    for (ci, client) in conns.iter().enumerate() {
        let client = client.clone();
        let inbox = Arc::new(inbox(&client).await?);
        let permits = Arc::new(Semaphore::new(window / conns.len()));
        let (counted, errors, body, tag) =
            (counted.clone(), errors.clone(), body.clone(), tag.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < total {
                let permit = permits.clone().acquire_owned().await?;
                n += 1;
                let subject = format!(
                    "ts.schedule.b{tag}-{}",
                    (n as usize * conns_hint() + ci) % processes
                );
                let (client, inbox, body, counted, errors) = (
                    client.clone(),
                    inbox.clone(),
                    body.clone(),
                    counted.clone(),
                    errors.clone(),
                );
                tokio::spawn(async move {
                    let r = send(&client, &inbox, n, subject, body).await;
                    let in_window = started.elapsed() >= warmup && started.elapsed() <= total;
                    match r {
                        Ok((_, Ok(()))) if in_window => {
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((_, Err(_))) | Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    drop(permit);
                });
            }
            // Let the last requests finish before the next phase.
            let _ = permits.acquire_many((window / conns_hint()) as u32).await;
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(Throughput {
        rate: counted.load(Ordering::Relaxed) as f64 / seconds,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// What a request carries in the queue-keys phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyMode {
    /// No `Ts-Queue-Key` (the path that must not touch the bucket).
    Plain,
    /// A new key every request: every request takes a hold (one create) and is assigned.
    Fresh,
    /// One key per process, never released (no worker): all but the first request
    /// are refused `queue_key_held` (the create fails, the hold is read).
    Held,
}

struct Measured {
    rate: f64,
    refused: u64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
}

/// A closed loop of `window` requests in flight over `processes`, like
/// [`closed_loop`], whose requests carry what `mode` says; counts answers of the
/// kind the mode expects (receipts; for `Held`, `queue_key_held` refusals) and their
/// latencies.
async fn keyed_loop(
    conns: &[async_nats::Client],
    body: &Bytes,
    processes: usize,
    window: usize,
    seconds: f64,
    mode: KeyMode,
) -> Result<Measured> {
    let warmup = Duration::from_millis(1000);
    let total = warmup + Duration::from_secs_f64(seconds);
    let counted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let lat: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let started = Instant::now();
    let tag = uuid_like();
    let per_conn = (window / conns.len()).max(1);
    let mut tasks = Vec::new();
    for (ci, client) in conns.iter().enumerate() {
        let client = client.clone();
        let inbox = Arc::new(inbox(&client).await?);
        let permits = Arc::new(Semaphore::new(per_conn));
        let (counted, refused, errors, lat, body, tag) = (
            counted.clone(),
            refused.clone(),
            errors.clone(),
            lat.clone(),
            body.clone(),
            tag.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < total {
                let permit = permits.clone().acquire_owned().await?;
                n += 1;
                let p = (n as usize * conns_hint() + ci) % processes;
                let subject = format!("ts.schedule.q{tag}-{p}");
                let headers = match mode {
                    KeyMode::Plain => None,
                    KeyMode::Fresh => {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert("Ts-Queue-Key", format!("k-{ci}-{n}").as_str());
                        Some(h)
                    }
                    KeyMode::Held => {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert("Ts-Queue-Key", "the-key");
                        Some(h)
                    }
                };
                let (client, inbox, body, counted, refused, errors, lat) = (
                    client.clone(),
                    inbox.clone(),
                    body.clone(),
                    counted.clone(),
                    refused.clone(),
                    errors.clone(),
                    lat.clone(),
                );
                tokio::spawn(async move {
                    let r = send_with(&client, &inbox, n, subject, headers, body).await;
                    let in_window = started.elapsed() >= warmup && started.elapsed() <= total;
                    if in_window {
                        // A receipt, a `queue_key_held` refusal, or anything else (an error).
                        let (assigned, held) = match &r {
                            Ok((_, Ok(()))) => (true, false),
                            Ok((_, Err(code))) => (false, code == "queue_key_held"),
                            Err(_) => (false, false),
                        };
                        if held {
                            refused.fetch_add(1, Ordering::Relaxed);
                        } else if !assigned {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        // Counted: what the mode expects.
                        if (assigned && mode != KeyMode::Held) || (held && mode == KeyMode::Held) {
                            counted.fetch_add(1, Ordering::Relaxed);
                            if let (Ok((d, _)), Ok(mut l)) = (&r, lat.lock()) {
                                l.push(*d);
                            }
                        }
                    }
                    drop(permit);
                });
            }
            let _ = permits.acquire_many(per_conn as u32).await;
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let mut l = lat.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort();
    Ok(Measured {
        rate: counted.load(Ordering::Relaxed) as f64 / seconds,
        refused: refused.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        p50_ms: percentile_ms(&l, 0.50),
        p99_ms: percentile_ms(&l, 0.99),
    })
}

/// Queue keys' cost, in one run: 1,000 processes, closed loop at the full window
/// (throughput) and at one request in flight per connection (latency), without a
/// key, with a fresh key per request (a hold taken: one atomic create), and with a
/// key that is held (refused at once).
async fn queue_keys_section(
    conns: &[async_nats::Client],
    body: &Bytes,
    window: usize,
    seconds: f64,
) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for (name, mode) in [
        ("plain", KeyMode::Plain),
        ("fresh_key", KeyMode::Fresh),
        ("held_key", KeyMode::Held),
    ] {
        let full = keyed_loop(conns, body, PROCESSES, window, seconds, mode).await?;
        let light = keyed_loop(conns, body, PROCESSES, conns.len(), seconds.min(3.0), mode).await?;
        out.insert(
            name.into(),
            json!({
                "per_s": full.rate.round(),
                "p50_ms": full.p50_ms,
                "p99_ms": full.p99_ms,
                "refused": full.refused,
                "errors": full.errors + light.errors,
                "light_per_s": light.rate.round(),
                "light_p50_ms": light.p50_ms,
                "light_p99_ms": light.p99_ms,
            }),
        );
    }
    let plain = out["plain"]["per_s"].as_f64().unwrap_or(0.0);
    let fresh = out["fresh_key"]["per_s"].as_f64().unwrap_or(0.0);
    out.insert(
        "fresh_vs_plain".into(),
        json!(if plain > 0.0 {
            (fresh / plain * 1000.0).round() / 1000.0
        } else {
            0.0
        }),
    );
    Ok(serde_json::Value::Object(out))
}

fn print_queue_keys_table(doc: &serde_json::Value) {
    println!();
    println!("| storage | schedule request | per s (window) | p50/p99 ms | per s (1 in flight a connection) | p50/p99 ms | errors |");
    println!("|---|---|---|---|---|---|---|");
    for r in doc["runs"].as_array().into_iter().flatten() {
        let q = &r["queue_keys"];
        for (name, label) in [
            ("plain", "no Ts-Queue-Key"),
            ("fresh_key", "Ts-Queue-Key, free (hold taken)"),
            ("held_key", "Ts-Queue-Key, held (refused)"),
        ] {
            let m = &q[name];
            println!(
                "| {} | {label} | {} | {:.2} / {:.2} | {} | {:.2} / {:.2} | {} |",
                r["storage"].as_str().unwrap_or(""),
                m["per_s"],
                m["p50_ms"].as_f64().unwrap_or(f64::NAN),
                m["p99_ms"].as_f64().unwrap_or(f64::NAN),
                m["light_per_s"],
                m["light_p50_ms"].as_f64().unwrap_or(f64::NAN),
                m["light_p99_ms"].as_f64().unwrap_or(f64::NAN),
                m["errors"],
            );
        }
        println!(
            "| {} | keyed vs plain (window) | {} | | | | |",
            r["storage"].as_str().unwrap_or(""),
            q["fresh_vs_plain"]
        );
    }
}

fn conns_hint() -> usize {
    CONNECTIONS
}

struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    achieved: f64,
}

/// Open loop at `rate` requests/s for a 1 s warm-up (actors start, not measured) and
/// then `seconds`: latency percentiles from send to reply.
async fn open_loop(
    conns: &[async_nats::Client],
    body: &Bytes,
    processes: usize,
    rate: f64,
    seconds: f64,
) -> Result<Latency> {
    let (answers, elapsed) = offer(conns, body, processes, rate, 1.0, seconds).await?;
    let mut l: Vec<Duration> = answers
        .iter()
        .filter(|(_, a)| a.is_ok())
        .map(|(d, _)| *d)
        .collect();
    l.sort();
    Ok(Latency {
        p50_ms: percentile_ms(&l, 0.50),
        p99_ms: percentile_ms(&l, 0.99),
        achieved: l.len() as f64 / elapsed,
    })
}

/// The `p` percentile of sorted `l`, in ms (two decimals); NaN when empty.
fn percentile_ms(l: &[Duration], p: f64) -> f64 {
    let v = l
        .get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(f64::NAN);
    (v * 100.0).round() / 100.0
}

/// Offers `rate` requests/s, open loop, over `processes` for `warmup` + `seconds`, in
/// small bursts every millisecond; returns the answers of the requests sent after the
/// warm-up, and the seconds they were sent over.
async fn offer(
    conns: &[async_nats::Client],
    body: &Bytes,
    processes: usize,
    rate: f64,
    warmup: f64,
    seconds: f64,
) -> Result<(Vec<Answer>, f64)> {
    let rate = rate.max(1.0);
    let skip = (rate * warmup) as u64;
    let tag = uuid_like();
    let mut inboxes = Vec::new();
    for c in conns {
        inboxes.push(Arc::new(inbox(c).await?));
    }
    let started = Instant::now();
    let total = (rate * (warmup + seconds)) as u64;
    let mut handles = Vec::with_capacity(total as usize);
    let tick = Duration::from_millis(1);
    let mut sent = 0u64;
    while sent < total {
        let due = ((started.elapsed().as_secs_f64() * rate) as u64).min(total);
        while sent < due {
            let ci = (sent as usize) % conns.len();
            let (client, inbox, body) = (conns[ci].clone(), inboxes[ci].clone(), body.clone());
            let subject = format!("ts.schedule.l{tag}-{}", (sent as usize) % processes);
            let n = sent;
            handles.push(tokio::spawn(async move {
                send(&client, &inbox, n, subject, body).await
            }));
            sent += 1;
        }
        tokio::time::sleep(tick).await;
    }
    let elapsed = started.elapsed().as_secs_f64() - warmup;
    let mut answers = Vec::with_capacity(handles.len());
    for (n, h) in handles.into_iter().enumerate() {
        let a = h.await.context("open-loop sender")??;
        if n as u64 >= skip {
            answers.push(a);
        }
    }
    Ok((answers, elapsed))
}

/// What a set of answers says: counts by outcome and latency percentiles.
fn summarise(answers: &[Answer]) -> serde_json::Value {
    let mut by_code: std::collections::BTreeMap<String, u64> = Default::default();
    for (_, a) in answers {
        *by_code
            .entry(match a {
                Ok(()) => "receipt".into(),
                Err(code) => code.clone(),
            })
            .or_default() += 1;
    }
    let mut all: Vec<Duration> = answers
        .iter()
        .filter(|(_, a)| a.as_ref().err().map(String::as_str) != Some("no_answer"))
        .map(|(d, _)| *d)
        .collect();
    all.sort();
    json!({
        "requests": answers.len(),
        "outcomes": by_code,
        "unanswered": by_code.get("no_answer").copied().unwrap_or(0),
        "answer_p50_ms": percentile_ms(&all, 0.50),
        "answer_p99_ms": percentile_ms(&all, 0.99),
        "answer_max_ms": percentile_ms(&all, 1.0),
    })
}

/// 1,000 requests at once to one process, each with its own 256-byte message id (the
/// alarm-loader's top-of-the-minute burst): how they were answered, and how fast.
async fn id_burst(conns: &[async_nats::Client], body: &Bytes) -> Result<serde_json::Value> {
    let tag = uuid_like();
    let mut inboxes = Vec::new();
    for c in conns {
        inboxes.push(Arc::new(inbox(c).await?));
    }
    let subject = format!("ts.schedule.burst{tag}");
    let mut handles = Vec::new();
    for i in 0..1000usize {
        let ci = i % conns.len();
        let (client, inbox, body, subject) = (
            conns[ci].clone(),
            inboxes[ci].clone(),
            body.clone(),
            subject.clone(),
        );
        let mut id = format!("{tag}-{i}-");
        id.extend(std::iter::repeat_n('i', 256 - id.len()));
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", id.as_str());
        handles.push(tokio::spawn(async move {
            send_with(&client, &inbox, i as u64, subject, Some(h), body).await
        }));
    }
    let mut answers = Vec::new();
    for h in handles {
        answers.push(h.await.context("burst sender")??);
    }
    Ok(summarise(&answers))
}

/// A top-level number of the scheduler's `$SRV.STATS`; null when it cannot be read.
async fn scheduler_stat(client: &async_nats::Client, key: &str) -> serde_json::Value {
    match client
        .request("$SRV.STATS.turnstile-scheduler", Bytes::new())
        .await
    {
        Ok(reply) => serde_json::from_slice::<serde_json::Value>(&reply.payload)
            .map(|v| v[key].clone())
            .unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

/// The scheduler's writer counters (runs as singles, batches, cost estimates), from
/// `$SRV.STATS`; null when they cannot be read.
async fn writer_stats(client: &async_nats::Client) -> serde_json::Value {
    let Ok(reply) = client
        .request("$SRV.STATS.turnstile-scheduler", Bytes::new())
        .await
    else {
        return serde_json::Value::Null;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&reply.payload) else {
        return serde_json::Value::Null;
    };
    let data = v["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "schedule")
        .map(|e| e["data"].clone())
        .unwrap_or_default();
    let keep = [
        "runs_stored",
        "assignments_stored",
        "singles_written",
        "batches_committed",
    ];
    keep.iter()
        .map(|k| (k.to_string(), data[*k].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Replies to every `ts.schedule.>` request at once with a receipt-sized payload.
async fn serve_echo(url: &str) -> Result<()> {
    let (url, credentials) = harness::split_url_credentials(url);
    let mut options = async_nats::ConnectOptions::new().subscription_capacity(1 << 20);
    if let Some((user, password)) = credentials {
        options = options.user_and_password(user, password);
    }
    let client = options.connect(url).await?;
    let mut sub = client
        .queue_subscribe("ts.schedule.>", "echo".into())
        .await?;
    let reply = Bytes::from(vec![b'r'; 400]);
    while let Some(msg) = sub.next().await {
        if let Some(to) = msg.reply {
            client.publish(to, reply.clone()).await?;
        }
    }
    Ok(())
}

/// Assignments of the process whose verification phase 5 times.
const VERIFY_ASSIGNMENTS: u64 = 100_000;
/// Times the verification is repeated (each with a fresh trust set: no signature
/// is remembered from one repetition to the next).
const VERIFY_REPETITIONS: u32 = 3;
/// Processes of the cold-load phase, rounds of requests each gets (one run or
/// more per round), requests per round, and head loads in flight for the parallel pass.
const COLD_PROCESSES: usize = 1000;
const COLD_ROUNDS: usize = 3;
const COLD_PER_ROUND: u64 = 4;
const COLD_PARALLEL: usize = 32;

/// `--only-log-reads`: a server and a scheduler of their own, then phase 5.
async fn log_reads_only(body: &Bytes) -> Result<()> {
    let server = NatsServer::start_with(Options::default())?;
    let dir = tempfile::tempdir()?;
    let key = protocol::keys::Keypair::generate();
    let key_path = dir.path().join("key.json");
    std::fs::write(&key_path, key.to_key_file())?;
    let _scheduler = tests::support::spawn_scheduler(&server, &key_path, &[])?;
    let probe = tests::support::connect(server.url()).await?;
    tests::support::wait_for_schedulers(&probe, 1).await?;
    let conns = connect_all(server.url()).await?;
    let reads = log_reads(&server, &conns, body, &key).await?;
    let doc = json!({"runs": [{"storage": "default sync", "log_reads": reads}]});
    println!(
        "{}",
        serde_json::to_string_pretty(&doc["runs"][0]["log_reads"])?
    );
    print_log_reads_table(&doc);
    Ok(())
}

/// Phase 5: what reading the log costs, against the running scheduler signing with `key`.
async fn log_reads(
    server: &NatsServer,
    conns: &[async_nats::Client],
    body: &Bytes,
    key: &protocol::keys::Keypair,
) -> Result<serde_json::Value> {
    let js = async_nats::jetstream::new(tests::support::connect(server.url()).await?);
    let reader =
        journal::reader::LogReader::open(js, journal::subjects::Subjects::default()).await?;
    let trust = || {
        let mut t = protocol::verify::TrustedKeys::default();
        t.insert(key.public_key());
        t
    };
    let verify = verify_throughput(server, conns, body, &reader, &trust).await?;
    eprintln!("verify: {verify}");
    let cold = cold_loads(conns, body, &reader, &trust).await?;
    eprintln!("cold loads: {cold}");
    let all = verify_all_section(body).await?;
    Ok(json!({"verify": verify, "cold_loads": cold, "verify_all": all}))
}

/// Writes `VERIFY_ASSIGNMENTS` to one process through the scheduler (runs of up to
/// 1,000), then times `journal::audit::verify` over it.
async fn verify_throughput(
    server: &NatsServer,
    conns: &[async_nats::Client],
    body: &Bytes,
    reader: &journal::reader::LogReader,
    trust: &dyn Fn() -> protocol::verify::TrustedKeys,
) -> Result<serde_json::Value> {
    let process = protocol::ProcessId::new(format!("v{}", uuid_like()))?;
    let t0 = Instant::now();
    let written = fill(
        conns,
        body,
        &[format!("ts.schedule.{process}")],
        VERIFY_ASSIGNMENTS,
        8192,
    )
    .await?;
    let write_s = t0.elapsed().as_secs_f64();
    let scope = journal::audit::Scope {
        process,
        from: 0,
        to: None,
        required: vec![],
    };
    let meter = CpuMeter::new(&[("nats", server.pid())]);
    let (before, self_before, t0) = (meter.sample(), cpu_seconds("self"), Instant::now());
    let mut report = journal::audit::Report::default();
    for _ in 0..VERIFY_REPETITIONS {
        report = journal::audit::verify(reader, &scope, trust(), |_| {}).await?;
    }
    let wall = t0.elapsed();
    let self_cpu = cpu_seconds("self") - self_before;
    let total = report.checked as f64 * f64::from(VERIFY_REPETITIONS);
    let rate = total / wall.as_secs_f64().max(1e-9);
    let per_core = if self_cpu > 0.0 {
        total / self_cpu
    } else {
        0.0
    };
    // The same through the CLI (its own process, allocator and parallel --all runner):
    // its --json totals carry its own wall and CPU rates.
    let cli = tokio::process::Command::new(harness::workspace_bin("turnstile")?)
        .args(["verify", scope.process.as_str(), "--json", "--no-progress"])
        .env("NATS_URL", server.url())
        .kill_on_drop(true)
        .output()
        .await?;
    let cli = serde_json::from_slice::<serde_json::Value>(&cli.stdout)
        .map(|doc| doc["totals"].clone())
        .unwrap_or_else(|e| json!({"error": e.to_string(), "exit": cli.status.code()}));
    Ok(json!({
        "assignments": report.checked,
        "written": written,
        "write_seconds": (write_s * 100.0).round() / 100.0,
        "runs": report.runs,
        "faults": report.faults.len(),
        "repetitions": VERIFY_REPETITIONS,
        "assignments_per_s": rate.round(),
        "assignments_per_s_per_core": per_core.round(),
        "bench_process_cpu_seconds": (self_cpu * 100.0).round() / 100.0,
        "cpu": meter.usage(&before, wall, rate),
        "cli": cli,
        "target_per_core_min": 1_000_000,
        "meets_target": per_core >= 1_000_000.0,
    }))
}

/// Writes `COLD_PROCESSES` processes of a few runs each, then loads every head as a
/// scheduler starting cold does (`journal::chain::load_head`): one after the other,
/// then `COLD_PARALLEL` at once (each pass with a fresh trust set).
async fn cold_loads(
    conns: &[async_nats::Client],
    body: &Bytes,
    reader: &journal::reader::LogReader,
    trust: &dyn Fn() -> protocol::verify::TrustedKeys,
) -> Result<serde_json::Value> {
    let tag = uuid_like();
    let processes = (0..COLD_PROCESSES)
        .map(|i| protocol::ProcessId::new(format!("c{tag}-{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let subjects: Vec<String> = processes
        .iter()
        .map(|p| format!("ts.schedule.{p}"))
        .collect();
    let mut written = 0;
    for _ in 0..COLD_ROUNDS {
        written += fill(conns, body, &subjects, COLD_PER_ROUND, 8192).await?;
    }
    let n = processes.len() as f64;
    let pass = |parallel: usize| {
        let trusted = trust();
        let processes = &processes;
        async move {
            let t0 = Instant::now();
            let loads: Vec<_> = futures::stream::iter(processes)
                .map(|p| journal::chain::load_head(reader, p, &trusted))
                .buffer_unordered(parallel)
                .collect()
                .await;
            let wall = t0.elapsed().as_secs_f64();
            let mut fast = 0;
            let mut runs = 0;
            for l in loads {
                let l = l?;
                fast += usize::from(!l.scanned);
                runs += u64::from(l.head_run.is_some());
            }
            Ok::<_, anyhow::Error>(json!({
                "in_flight": parallel,
                "loads_per_s": (n / wall.max(1e-9)).round(),
                "us_per_load": (wall / n * 1e7).round() / 10.0,
                "fast_path": fast,
                "with_head": runs,
            }))
        }
    };
    let sequential = pass(1).await?;
    let parallel = pass(COLD_PARALLEL).await?;
    Ok(json!({
        "processes": COLD_PROCESSES,
        "assignments_written": written,
        "sequential": sequential,
        "parallel": parallel,
    }))
}

/// Sends `per_subject` requests to each of `subjects` (interleaved), `window` in
/// flight over the connections; returns how many were answered with a receipt.
async fn fill(
    conns: &[async_nats::Client],
    body: &Bytes,
    subjects: &[String],
    per_subject: u64,
    window: usize,
) -> Result<u64> {
    let mut inboxes = Vec::new();
    for c in conns {
        inboxes.push(Arc::new(inbox(c).await?));
    }
    let permits = Arc::new(Semaphore::new(window));
    let ok = Arc::new(AtomicU64::new(0));
    let total = per_subject * subjects.len() as u64;
    for i in 0..total {
        let permit = permits.clone().acquire_owned().await?;
        let ci = (i as usize) % conns.len();
        let subject = subjects[(i as usize) % subjects.len()].clone();
        let (client, inbox, body, ok) = (
            conns[ci].clone(),
            inboxes[ci].clone(),
            body.clone(),
            ok.clone(),
        );
        tokio::spawn(async move {
            if let Ok((_, Ok(()))) = send(&client, &inbox, i, subject, body).await {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    let _ = permits.acquire_many(window as u32).await?;
    Ok(ok.load(Ordering::Relaxed))
}

/// The log `verify --all` reads in phase 5: processes, runs of each, assignments a run.
const ALL_PROCESSES: usize = 1000;
const ALL_RUNS: usize = 10;
const ALL_PER_RUN: usize = 10;

/// Phase 5, `verify --all`: on a server of its own, a log of `ALL_PROCESSES` processes
/// (`ALL_RUNS` sealed runs of `ALL_PER_RUN` assignments each, written straight to the
/// stream as the scheduler writes them), then, in the same run over the same log:
/// the raw read ceiling (`LogReader::read_range`, the pull consumer `verify --all`
/// reads through, nothing decoded), `journal::audit::verify_log` over every process
/// (one read of the stream), the old way for comparison (every process read by a
/// consumer of its own, `2 × cores` at once, as `verify --all` did before), and the
/// CLI's `turnstile verify --all` (its own process).
async fn verify_all_section(body: &Bytes) -> Result<serde_json::Value> {
    use journal::audit::{self, Scope, Selection};
    let server = NatsServer::start_with(Options::default())?;
    let js =
        async_nats::jetstream::new(tests::support::connect(&server.url_as(Role::Operator)).await?);
    let subjects = journal::subjects::Subjects::default();
    journal::setup::ensure_log(&js, &subjects, &Default::default()).await?;
    let key = protocol::keys::Keypair::generate();
    let dir = tempfile::tempdir()?;
    let key_path = dir.path().join("key.json");
    std::fs::write(&key_path, key.to_key_file())?;
    let trusted = || {
        let mut t = protocol::verify::TrustedKeys::default();
        t.insert(key.public_key());
        t
    };

    // The log: round by round, one run of every process, sealed in one batch and
    // published pipelined, each expecting its process's last sequence.
    let tag = uuid_like();
    let processes = (0..ALL_PROCESSES)
        .map(|i| protocol::ProcessId::new(format!("a{tag}-{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut heads: Vec<scheduler::core::Head> = processes
        .iter()
        .map(scheduler::core::Head::genesis)
        .collect();
    let t0 = Instant::now();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    for round in 0..ALL_RUNS {
        let mut built = Vec::with_capacity(processes.len());
        for (p, head) in processes.iter().zip(&heads) {
            let messages = (0..ALL_PER_RUN)
                .map(|i| scheduler::core::NewMessage {
                    message_id: format!("{round}-{i}"),
                    headers: vec![],
                    body: body.to_vec(),
                })
                .collect();
            built.push(scheduler::core::build_run(p, head, messages, now));
        }
        let digests: Vec<_> = built
            .iter()
            .map(|(run, tree)| protocol::seal::run_digest(&run.statement_for(tree)))
            .collect();
        let seals = protocol::seal::seal(&digests, &[&key]);
        let mut acks = Vec::with_capacity(built.len());
        for (((mut run, _), seal), p) in built.into_iter().zip(seals).zip(&processes) {
            run.seal = seal;
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .payload(run.encode()?.into())
                .headers(journal::reader::RunMeta::headers_of(&run))
                .expected_last_subject_sequence(run.prev_seq);
            acks.push((run, js.send_publish(subjects.log(p), publish).await?));
        }
        for ((run, ack), head) in acks.into_iter().zip(heads.iter_mut()) {
            let seq = ack.await?.sequence;
            *head = scheduler::core::Head::after(&run, seq);
        }
    }
    let write_s = t0.elapsed().as_secs_f64();
    let reader = journal::reader::LogReader::open(js.clone(), subjects.clone()).await?;
    let last = reader.last_sequence().await?;
    let assignments = (ALL_PROCESSES * ALL_RUNS * ALL_PER_RUN) as u64;
    let parallel = 2 * std::thread::available_parallelism().map_or(1, |n| n.get());
    let meter = CpuMeter::new(&[("nats", server.pid())]);
    let row = |what: &str,
               wall: Duration,
               self_cpu: f64,
               messages: u64,
               checked: u64,
               before: &[f64],
               meter: &CpuMeter| {
        let s = wall.as_secs_f64().max(1e-9);
        json!({
            "read": what,
            "seconds": (s * 1000.0).round() / 1000.0,
            "messages": messages,
            "messages_per_s": (messages as f64 / s).round(),
            "assignments": checked,
            "assignments_per_s": (checked as f64 / s).round(),
            "bench_process_cpu_seconds": (self_cpu * 100.0).round() / 100.0,
            "cpu": meter.usage(before, wall, messages as f64 / s),
        })
    };

    // 1. The raw read ceiling: the same pull consumer, nothing decoded or judged.
    let (before, self_before, t0) = (meter.sample(), cpu_seconds("self"), Instant::now());
    let (_, mut stream) = reader.read_range(subjects.log_all(), 1, last).await?;
    let (mut raw_messages, mut raw_bytes) = (0u64, 0u64);
    while let Some(m) = stream.next().await {
        let m = m?;
        raw_messages += 1;
        raw_bytes += m.message.payload.len() as u64;
    }
    drop(stream);
    let raw = row(
        "raw read (pull consumer, no verification)",
        t0.elapsed(),
        cpu_seconds("self") - self_before,
        raw_messages,
        0,
        &before,
        &meter,
    );
    eprintln!("verify --all: raw read: {raw}");

    // 2. verify --all: one read of the stream, every process judged as it arrives.
    let (before, self_before, t0) = (meter.sample(), cpu_seconds("self"), Instant::now());
    let all = audit::verify_log(
        &reader,
        &Selection::All { required: vec![] },
        trusted(),
        parallel,
        |_, _| {},
    )
    .await?;
    let wall = t0.elapsed();
    let all_checked: u64 = all.iter().map(|v| v.report.checked).sum();
    let all_messages: u64 = all.iter().map(|v| v.report.messages).sum();
    let all_faults: usize = all.iter().map(|v| v.report.faults.len()).sum();
    let mut one_read = row(
        "verify --all: one read of the stream (journal::audit::verify_log)",
        wall,
        cpu_seconds("self") - self_before,
        all_messages,
        all_checked,
        &before,
        &meter,
    );
    one_read["processes"] = json!(all.len());
    one_read["faults"] = json!(all_faults);
    eprintln!("verify --all: one read: {one_read}");

    // 3. The old way, for comparison: a consumer of its own per process.
    let (before, self_before, t0) = (meter.sample(), cpu_seconds("self"), Instant::now());
    let listed = audit::processes(&js, &subjects).await?;
    // One trust set for the pass, its clones sharing the signatures verified (as the
    // CLI's parallel readers did).
    let shared = trusted();
    let reports: Vec<_> = futures::stream::iter(listed.iter().filter_map(|l| l.process.clone()))
        .map(|process| {
            let (reader, trusted) = (&reader, shared.clone());
            async move {
                let scope = Scope {
                    process,
                    from: 0,
                    to: None,
                    required: vec![],
                };
                audit::verify(reader, &scope, trusted, |_| {}).await
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    let wall = t0.elapsed();
    let (mut per_checked, mut per_messages, mut per_faults) = (0u64, 0u64, 0usize);
    for r in reports {
        let r = r?;
        per_checked += r.checked;
        per_messages += r.messages;
        per_faults += r.faults.len();
    }
    let mut per_process = row(
        "per-process reads (a consumer per process, the old way)",
        wall,
        cpu_seconds("self") - self_before,
        per_messages,
        per_checked,
        &before,
        &meter,
    );
    per_process["processes"] = json!(listed.len());
    per_process["in_flight"] = json!(parallel);
    per_process["faults"] = json!(per_faults);
    eprintln!("verify --all: per-process reads: {per_process}");

    // 4. The CLI, its own process: its --json totals carry its own wall time.
    let cli = tokio::process::Command::new(harness::workspace_bin("turnstile")?)
        .args(["verify", "--all", "--json", "--no-progress", "--trust"])
        .arg(&key_path)
        .env("NATS_URL", server.url())
        .kill_on_drop(true)
        .output()
        .await?;
    let cli_exit = cli.status.code();
    let cli = serde_json::from_slice::<serde_json::Value>(&cli.stdout)
        .map(|doc| doc["totals"].clone())
        .unwrap_or_else(|e| json!({"error": e.to_string()}));
    eprintln!("verify --all: CLI: {cli}");

    let rate = |v: &serde_json::Value| v["messages_per_s"].as_f64().unwrap_or(0.0);
    let ratio = |a: f64, b: f64| ((a / b.max(1e-9)) * 1000.0).round() / 1000.0;
    Ok(json!({
        "processes": ALL_PROCESSES,
        "runs_per_process": ALL_RUNS,
        "assignments_per_run": ALL_PER_RUN,
        "messages": last,
        "assignments": assignments,
        "payload_bytes": raw_bytes,
        "write_seconds": (write_s * 100.0).round() / 100.0,
        "raw": raw,
        "one_read": one_read,
        "per_process": per_process,
        "cli": cli,
        "cli_exit": cli_exit,
        "one_read_vs_raw": ratio(rate(&one_read), rate(&raw)),
        "one_read_vs_per_process": ratio(rate(&one_read), rate(&per_process)),
        "same_verdicts": all_checked == assignments && per_checked == assignments
            && all_faults == 0 && per_faults == 0,
    }))
}

fn print_verify_all_table(v: &serde_json::Value) {
    if !v.is_object() {
        return;
    }
    println!();
    println!(
        "verify --all over {} processes ({} messages, {} assignments; same verdicts: {}; one read vs raw {}, vs per-process {}):",
        v["processes"], v["messages"], v["assignments"], v["same_verdicts"],
        v["one_read_vs_raw"], v["one_read_vs_per_process"]
    );
    println!("| read | seconds | messages/s | assignments/s | bench CPU s | nats-server cores |");
    println!("|---|---|---|---|---|---|");
    for key in ["raw", "one_read", "per_process"] {
        let r = &v[key];
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r["read"].as_str().unwrap_or(key),
            r["seconds"],
            r["messages_per_s"],
            r["assignments_per_s"],
            r["bench_process_cpu_seconds"],
            r["cpu"]["nats_cores"],
        );
    }
    let c = &v["cli"];
    println!(
        "| turnstile verify --all (CLI process, exit {}) | {} | — | {} | {} (its own) | — |",
        v["cli_exit"], c["seconds"], c["assignments_per_s"], c["cpu_seconds"]
    );
}

fn print_log_reads_table(doc: &serde_json::Value) {
    let rows: Vec<&serde_json::Value> = doc["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["log_reads"].is_object())
        .collect();
    if rows.is_empty() {
        return;
    }
    println!();
    println!("| storage | verify: assignments (runs) | assignments/s | assignments/s per core (bench CPU) | nats-server cores | CLI verify /s (per core) | cold loads: sequential /s (µs each) | {COLD_PARALLEL} at once /s (µs each) | fast path |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let v = &r["log_reads"]["verify"];
        let c = &r["log_reads"]["cold_loads"];
        println!(
            "| {} | {} ({}) | {} | {} {} | {} | {} ({}) | {} ({}) | {} ({}) | {} / {} |",
            r["storage"].as_str().unwrap_or(""),
            v["assignments"],
            v["runs"],
            v["assignments_per_s"],
            v["assignments_per_s_per_core"],
            if v["meets_target"].as_bool() == Some(true) {
                "✓"
            } else {
                "✗ (<1M)"
            },
            v["cpu"]["nats_cores"],
            v["cli"]["assignments_per_s"],
            v["cli"]["assignments_per_cpu_s"],
            c["sequential"]["loads_per_s"],
            c["sequential"]["us_per_load"],
            c["parallel"]["loads_per_s"],
            c["parallel"]["us_per_load"],
            c["sequential"]["fast_path"],
            c["processes"],
        );
    }
    for r in doc["runs"].as_array().into_iter().flatten() {
        print_verify_all_table(&r["log_reads"]["verify_all"]);
    }
}

/// The alarm-loader's section: setting alarms through the NATS API (pipelined),
/// lateness of 10,000 alarms a second for 10 s into 1,000 processes, and 100,000 alarms
/// due in one second (time until the last fired). Its own server (default storage), a
/// scheduler and one loader (release builds, separate processes); the raw JetStream
/// publish ceiling measured in the same run.
async fn alarms_section(
    body: &Bytes,
    seconds: f64,
    rounds: &[usize],
    only_set: bool,
) -> Result<serde_json::Value> {
    use base64::Engine as _;
    let server = NatsServer::start_with(Options::default())?;
    let raw = raw_ceiling(&server.url_as(Role::Operator), body, seconds).await?;
    let dir = tempfile::tempdir()?;
    let key = protocol::keys::Keypair::generate();
    let key_path = dir.path().join("key.json");
    std::fs::write(&key_path, key.to_key_file())?;
    let scheduler = tests::support::spawn_scheduler(&server, &key_path, &[])?;
    let probe = tests::support::connect(server.url()).await?;
    tests::support::wait_for_schedulers(&probe, 1).await?;
    // A loader of its own process, serving (its partitions taken), and the meter of
    // the three processes.
    let start_loader = || async {
        let loader = harness::Process::spawn(tests::support::loader_command(
            &server,
            &["--in-memory-interval-ms", "1000"],
        )?)?;
        // The loader answers PING once its endpoints serve; give its partitions a moment.
        for _ in 0..100 {
            if probe
                .request("$SRV.PING.turnstile-alarm-loader", Bytes::new())
                .await
                .is_ok_and(|m| !m.payload.is_empty())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let meter = CpuMeter::new(&[
            ("nats", server.pid()),
            ("alarm-loader", loader.pid()),
            ("scheduler", scheduler.pid()),
        ]);
        anyhow::Ok((loader, meter))
    };
    let (mut loader, mut meter) = start_loader().await?;
    let conns = connect_all(server.url()).await?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&body[..64]);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    // Sets `n` alarms `due(i)` with `window` in flight; (sets/s, errors).
    let set_many = |prefix: &'static str,
                    n: usize,
                    due: Arc<dyn Fn(usize) -> u64 + Send + Sync>| {
        let conns = conns.clone();
        let b64 = b64.clone();
        async move {
            let permits = Arc::new(Semaphore::new(1024));
            let errors = Arc::new(AtomicU64::new(0));
            let t0 = Instant::now();
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                let permit = Arc::clone(&permits).acquire_owned().await?;
                let c = conns[i % conns.len()].clone();
                let req = json!({
                    "id": format!("{prefix}{i}"), "due_ms": due(i),
                    "target": {"process": format!("alarmed-{}", i % PROCESSES)}, "body": b64,
                });
                let errors = Arc::clone(&errors);
                tasks.push(tokio::spawn(async move {
                    let _p = permit;
                    let bytes = serde_json::to_vec(&req).unwrap_or_default();
                    match c.request("ts.alarm.set", bytes.into()).await {
                        Ok(m) if m.headers.as_ref().and_then(|h| h.get("Ts-Error")).is_none() => {}
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            let rate = n as f64 / t0.elapsed().as_secs_f64();
            anyhow::Ok((rate, errors.load(Ordering::Relaxed)))
        }
    };
    let delivered = |probe: async_nats::Client| async move {
        let m = probe
            .request("$SRV.STATS.turnstile-alarm-loader", Bytes::new())
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        anyhow::Ok(v["endpoints"][0]["data"].clone())
    };

    // 1. Setting: 50,000 alarms due in an hour (they do not fire here).
    let far = now_ms() + 3_600_000;
    let (before, t0) = (meter.sample(), Instant::now());
    let (set_rate, set_errors) = set_many("s", 50_000, Arc::new(move |_| far)).await?;
    let set_cpu = meter.usage(&before, t0.elapsed(), set_rate);
    eprintln!("alarms set: {set_rate:.0}/s ({set_errors} errors); cpu {set_cpu}");
    // 1b. Replacing: the same 50,000 moved a minute on (another bucket: each replace
    // reads the alarm, writes its entry and record, and removes its old entry).
    let (before, t0) = (meter.sample(), Instant::now());
    let (replace_rate, replace_errors) =
        set_many("s", 50_000, Arc::new(move |_| far + 60_000)).await?;
    let replace_cpu = meter.usage(&before, t0.elapsed(), replace_rate);
    eprintln!("alarms replaced: {replace_rate:.0}/s ({replace_errors} errors); cpu {replace_cpu}");
    let replace = json!({
        "replace_per_s": replace_rate.round(), "replace_errors": replace_errors,
        "cpu_replace": replace_cpu,
    });
    // 1c. Setting in bulk: 50,000 new ids through `set_many`, 1,000 a request, 16
    // requests in flight.
    let (before, t0) = (meter.sample(), Instant::now());
    let (many_rate, many_errors) = {
        let n = 50_000usize;
        let per = 1_000usize;
        let permits = Arc::new(Semaphore::new(16));
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for r in 0..n / per {
            let permit = Arc::clone(&permits).acquire_owned().await?;
            let c = conns[r % conns.len()].clone();
            let alarms: Vec<serde_json::Value> = (r * per..(r + 1) * per)
                .map(|i| {
                    json!({
                        "id": format!("t{i}"), "due_ms": far,
                        "target": {"process": format!("alarmed-{}", i % PROCESSES)}, "body": b64,
                    })
                })
                .collect();
            let errors = Arc::clone(&errors);
            tasks.push(tokio::spawn(async move {
                let _p = permit;
                let bytes = serde_json::to_vec(&json!({ "alarms": alarms })).unwrap_or_default();
                match c.request("ts.alarm.set_many", bytes.into()).await {
                    Ok(m) if m.headers.as_ref().and_then(|h| h.get("Ts-Error")).is_none() => {
                        let v: serde_json::Value =
                            serde_json::from_slice(&m.payload).unwrap_or_default();
                        let refused = v["results"].as_array().map_or(per, |r| {
                            r.iter().filter(|x| x.get("error").is_some()).count()
                                + per.saturating_sub(r.len())
                        });
                        errors.fetch_add(refused as u64, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(per as u64, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        (
            n as f64 / t0.elapsed().as_secs_f64(),
            errors.load(Ordering::Relaxed),
        )
    };
    let many_cpu = meter.usage(&before, t0.elapsed(), many_rate);
    eprintln!("alarms set in bulk: {many_rate:.0}/s ({many_errors} errors); cpu {many_cpu}");
    let bulk = json!({
        "set_many_per_s": many_rate.round(), "set_many_errors": many_errors,
        "set_many_vs_raw": (many_rate / raw * 1000.0).round() / 1000.0,
        "cpu_set_many": many_cpu,
    });
    if only_set {
        return Ok(json!({
            "raw_ceiling_msgs_per_s": raw.round(),
            "set_per_s": set_rate.round(), "set_errors": set_errors,
            "set_vs_raw": (set_rate / raw * 1000.0).round() / 1000.0,
            "set_target_min": 50000, "cpu_set": set_cpu,
            "replace": replace, "set_many": bulk,
        }));
    }

    // 2. Lateness: 1,000 and 10,000 a second for 10 s, set ahead of time; each on a
    // loader started afresh, whose STATS then hold that phase's firings alone.
    let spread_s = 10usize;
    let mut spreads = serde_json::Map::new();
    for (round, per_s) in [1_000usize, 10_000].into_iter().enumerate() {
        if round > 0 {
            loader.terminate(Duration::from_secs(10));
            (loader, meter) = start_loader().await?;
        }
        let lead =
            60_000u64.max((per_s * spread_s) as u64 * 1000 / (set_rate.max(1.0) as u64) + 15_000);
        let start = now_ms() + lead;
        let prefix: &'static str = if round == 0 { "k" } else { "l" };
        let (_, errs_l) = set_many(
            prefix,
            per_s * spread_s,
            Arc::new(move |i| start + (i as u64 * 1000) / per_s as u64),
        )
        .await?;
        let base = delivered(probe.clone()).await?["delivered"]
            .as_u64()
            .unwrap_or(0);
        let target = base + (per_s * spread_s) as u64 - errs_l;
        // CPU from a second before the first is due until the last fired, per alarm.
        let first_due = start.saturating_sub(1000);
        while now_ms() < first_due {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (cpu_before, cpu_t0) = (meter.sample(), Instant::now());
        let deadline = Instant::now() + Duration::from_millis(lead + 60_000);
        let mut data = serde_json::Value::Null;
        while Instant::now() < deadline {
            data = delivered(probe.clone()).await?;
            if data["delivered"].as_u64().unwrap_or(0) >= target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let fired = data["delivered"].as_u64().unwrap_or(0).saturating_sub(base);
        let spread_cpu = meter.usage(
            &cpu_before,
            cpu_t0.elapsed(),
            fired as f64 / cpu_t0.elapsed().as_secs_f64().max(1e-9),
        );
        let spread = json!({
            "alarms": per_s * spread_s, "set_errors": errs_l, "cpu": spread_cpu,
            "delivered": fired,
            "lateness_ms": data["lateness_ms"].clone(),
            "dispatch_us": data["dispatch_us"].clone(),
            "read_ahead": data["read_ahead"].clone(),
            "upkeep_us": data["upkeep_us"].clone(),
            "targets": {"p99_ms_max": 5, "max_ms_max": 20},
        });
        eprintln!("{per_s}/s for 10 s: {spread}");
        spreads.insert(format!("lateness_{}k_per_s_10s", per_s / 1000), spread);
    }

    // 3. 100,000 due in the same second.
    let n = 100_000usize;
    let lead = 60_000u64.max(n as u64 * 1000 / (set_rate.max(1.0) as u64) + 15_000);
    let due = now_ms() + lead;
    let (_, errs_b) = set_many("b", n, Arc::new(move |i| due + (i as u64 % 1000))).await?;
    let base = delivered(probe.clone()).await?["delivered"]
        .as_u64()
        .unwrap_or(0);
    let target = base + n as u64 - errs_b;
    while now_ms() < due.saturating_sub(1000) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (cpu_before, cpu_t0) = (meter.sample(), Instant::now());
    let deadline = Instant::now() + Duration::from_millis(lead + 300_000);
    let mut last_ms = None;
    while Instant::now() < deadline {
        let d = delivered(probe.clone()).await?["delivered"]
            .as_u64()
            .unwrap_or(0);
        if d >= target {
            last_ms = Some(now_ms().saturating_sub(due + 1000));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let burst_cpu = meter.usage(
        &cpu_before,
        cpu_t0.elapsed(),
        n as f64 / cpu_t0.elapsed().as_secs_f64().max(1e-9),
    );
    let burst = json!({"alarms": n, "set_errors": errs_b, "last_fired_after_the_second_ms": last_ms, "cpu": burst_cpu});
    eprintln!("100,000 due in one second: {burst}");

    // 4. Capacity: pending alarms far ahead (an hour to two from now) do not enter the
    // window: the loader's memory and the time to load one window stay flat as they
    // grow. Measured at 100k and 1M pending.
    let rss_kb = |pid: Option<u32>| -> u64 {
        pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    };
    let mut capacity = Vec::new();
    let mut pending = 50_000usize; // the set phase's, due in an hour
    for (round, &total) in rounds.iter().enumerate() {
        if total <= pending {
            continue;
        }
        let add = total - pending;
        let base = now_ms() + 3_600_000;
        let Some(&prefix) = ["c", "d", "e", "f", "g", "h"].get(round) else {
            anyhow::bail!("at most six capacity rounds");
        };
        let (rate, errs) = set_many(
            prefix,
            add,
            Arc::new(move |i| base + (i as u64 * 7) % 3_600_000),
        )
        .await?;
        pending = total;
        // Two window loads after the sets, then read what the last one cost.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let d = delivered(probe.clone()).await?;
        let row = json!({
            "pending": total, "set_per_s": rate.round(), "set_errors": errs,
            "loader_rss_mb": rss_kb(loader.pid()) / 1024,
            "last_window_load_ms": d["last_load_us"].as_u64().map(|u| u as f64 / 1000.0),
            "last_window_entries": d["last_load_entries"],
            "armed": d["armed"],
        });
        eprintln!("capacity: {row}");
        capacity.push(row);
    }
    Ok(json!({
        "raw_ceiling_msgs_per_s": raw.round(),
        "set_per_s": set_rate.round(), "set_errors": set_errors, "set_vs_raw": (set_rate / raw * 1000.0).round() / 1000.0,
        "set_target_min": 50000, "cpu_set": set_cpu,
        "replace": replace, "set_many": bulk,
        "lateness_1k_per_s_10s": spreads.get("lateness_1k_per_s_10s"),
        "lateness_10k_per_s_10s": spreads.get("lateness_10k_per_s_10s"),
        "burst_100k_in_one_second": burst,
        "capacity": capacity,
        "capacity_target": {"pending": 10_000_000, "loader_rss_mb_max": 256},
    }))
}

fn print_alarms_table(a: &serde_json::Value) {
    if a.is_null() {
        return;
    }
    println!();
    println!("| alarms pending (due in 1–2 h) | loader RSS MB | one window load ms (entries) | alarms in memory |");
    println!("|---|---|---|---|");
    for c in a["capacity"].as_array().into_iter().flatten() {
        println!(
            "| {} | {} | {} ({}) | {} |",
            c["pending"],
            c["loader_rss_mb"],
            c["last_window_load_ms"],
            c["last_window_entries"],
            c["armed"]
        );
    }
    let l = &a["lateness_10k_per_s_10s"]["lateness_ms"];
    let low = &a["lateness_1k_per_s_10s"]["lateness_ms"];
    println!();
    println!("| alarm-loader | set /s: one a request; set_many (vs raw) | lateness p50 / p99 / max ms (10k/s × 10 s) | lateness p50 / p99 / max ms (1k/s × 10 s) | 100k due in 1 s: last fired after | CPU µs per alarm fired (10k/s; 1k/s; 100k) |");
    println!("|---|---|---|---|---|---|");
    let within = |l: &serde_json::Value| {
        if l["p99"].as_i64().is_some_and(|p| p <= 5) && l["max"].as_i64().is_some_and(|m| m <= 20) {
            "✓"
        } else {
            "✗ (p99 ≤ 5, max ≤ 20)"
        }
    };
    println!(
        "| default sync | {}; {} ({}) {} | {} / {} / {} {} | {} / {} / {} | {} ms | {}; {}; {} |",
        a["set_per_s"],
        a["set_many"]["set_many_per_s"],
        a["set_many"]["set_many_vs_raw"],
        if a["set_per_s"]
            .as_f64()
            .unwrap_or(0.0)
            .max(a["set_many"]["set_many_per_s"].as_f64().unwrap_or(0.0))
            >= 50_000.0
        {
            "✓"
        } else {
            "✗ (<50k)"
        },
        l["p50"],
        l["p99"],
        l["max"],
        within(l),
        low["p50"],
        low["p99"],
        low["max"],
        a["burst_100k_in_one_second"]["last_fired_after_the_second_ms"],
        a["lateness_10k_per_s_10s"]["cpu"]["cpu_us_per_op"],
        a["lateness_1k_per_s_10s"]["cpu"]["cpu_us_per_op"],
        a["burst_100k_in_one_second"]["cpu"]["cpu_us_per_op"],
    );
    println!();
    println!("| alarm-loader | set /s (CPU µs per set) | set_many /s (CPU µs per set) | replace /s (CPU µs per replace) |");
    println!("|---|---|---|---|");
    println!(
        "| default sync | {} ({}) | {} ({}) | {} ({}) |",
        a["set_per_s"],
        a["cpu_set"]["cpu_us_per_op"],
        a["set_many"]["set_many_per_s"],
        a["set_many"]["cpu_set_many"]["cpu_us_per_op"],
        a["replace"]["replace_per_s"],
        a["replace"]["cpu_replace"]["cpu_us_per_op"],
    );
}

/// Resident memory of `pid` in kB (0 when unreadable).
fn rss_kb_of(pid: Option<u32>) -> u64 {
    pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Messages stored in `stream` now.
async fn stream_messages(js: &async_nats::jetstream::Context, stream: &str) -> Result<u64> {
    Ok(js.get_stream(stream).await?.info().await?.state.messages)
}

/// One measured phase of a worker group: what it did while a closed-loop producer
/// saturated the scheduler.
struct GroupPhase {
    /// Results stored per second over the measured seconds (after a 1 s warm-up).
    rate: f64,
    /// Seconds from the producer's end until the last job was done.
    drained_s: f64,
    /// Jobs the phase recorded in all.
    total: u64,
    /// `total` over the time from the producer's start to the last job done.
    through_rate: f64,
    /// The producer's own figures.
    produced: Throughput,
    /// CPU over the measured seconds alone (the producer running), per job stored
    /// then: the whole phase's figure averages the drain in and hides a saturated box.
    cpu_measured: serde_json::Value,
}

/// Runs the producer for a warm-up second plus `seconds`, counts the results stored
/// in the measured seconds, then waits until every job is done: nothing in the work
/// stream and the results unchanged for 2 s (the feeder may still be behind the log
/// while the work stream is momentarily empty).
async fn group_phase(
    js: &async_nats::jetstream::Context,
    conns: &[async_nats::Client],
    body: &Bytes,
    window: usize,
    seconds: f64,
    meter: &CpuMeter,
) -> Result<GroupPhase> {
    let results_before = stream_messages(js, "TS_RESULTS").await?;
    let producer = {
        let (conns, body) = (conns.to_vec(), body.clone());
        tokio::spawn(async move { closed_loop(&conns, &body, PROCESSES, window, seconds).await })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r0 = stream_messages(js, "TS_RESULTS").await?;
    let (cpu0, t0) = (meter.sample(), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let r1 = stream_messages(js, "TS_RESULTS").await?;
    let rate = (r1 - r0) as f64 / seconds;
    let cpu_measured = meter.usage(&cpu0, t0.elapsed(), rate);
    let produced = producer.await??;
    let drain_start = Instant::now();
    let mut drained_s = f64::NAN;
    let (mut last, mut still) = (0u64, Instant::now());
    while drain_start.elapsed() < Duration::from_secs(300) {
        let queued = stream_messages(js, "TS_WORK").await?;
        let n = stream_messages(js, "TS_RESULTS").await?;
        if n != last {
            (last, still) = (n, Instant::now());
        }
        if queued == 0 && still.elapsed() >= Duration::from_secs(2) {
            drained_s = (still - drain_start).as_secs_f64().max(0.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total = stream_messages(js, "TS_RESULTS").await? - results_before;
    // Every job of the phase, from the producer's start until the last is done: the
    // rate the whole pipeline sustained (the window rate undercounts while the
    // feeder meets 1,000 processes for the first time).
    let through_rate = total as f64 / (1.0 + seconds + drained_s.max(0.0));
    Ok(GroupPhase {
        rate,
        drained_s,
        total,
        through_rate,
        produced,
        cpu_measured,
    })
}

/// The workers, end to end: a client schedules into 1,000 processes, the scheduler
/// assigns, one group of two instances (`worker --noop`: a Rust handler that does
/// nothing) runs each job and records its outcome. Jobs/s is the growth of the results
/// stream while the producer saturates, beside the scheduler-only rate of the same
/// run; then schedule-to-start latency at half that rate; worker memory under a
/// producer that outruns the workers (bounded buffer).
async fn workers_section(body: &Bytes, seconds: f64, window: usize) -> Result<serde_json::Value> {
    let server = NatsServer::start_with(Options::default())?;
    let dir = tempfile::tempdir()?;
    let key = protocol::keys::Keypair::generate();
    let key_path = dir.path().join("key.json");
    std::fs::write(&key_path, key.to_key_file())?;
    let scheduler = tests::support::spawn_scheduler(&server, &key_path, &[])?;
    let probe = tests::support::connect(server.url()).await?;
    tests::support::wait_for_schedulers(&probe, 1).await?;
    let conns = connect_all(server.url()).await?;
    // 1. The scheduler alone (no group yet: a new group starts at the log's end).
    let alone = closed_loop(&conns, body, PROCESSES, window, seconds).await?;
    eprintln!(
        "scheduler alone, {PROCESSES} processes: {:.0} assignments/s",
        alone.rate
    );
    // 2. Two instances of one group.
    // An instance of `group` (no-op handler, bounded buffer), with `extra` flags.
    let spawn = |group: &str, extra: &[&str], n: usize| -> Result<harness::Process> {
        let mut cmd = std::process::Command::new(harness::workspace_bin("worker")?);
        cmd.args(["--group", group, "--noop", "--concurrency", "64"])
            .args(["--buffer", "bounded:1024"])
            .args(extra)
            .env("NATS_URL", server.url_as(Role::JobWorker))
            .env("TS_INTAKE_URL", server.url_as(Role::Worker))
            .env(
                "RUST_LOG",
                std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("BENCH_INSTANCE", n.to_string());
        Ok(harness::Process::spawn(cmd)?)
    };
    let w1 = spawn("bench", &[], 1)?;
    let w2 = spawn("bench", &[], 2)?;
    tests::support::wait_for_service(&probe, "turnstile-worker", 2).await?;
    tokio::time::sleep(Duration::from_secs(3)).await; // the feeder's lease
    let operator = tests::support::connect(&server.url_as(Role::Operator)).await?;
    let js = async_nats::jetstream::new(operator);
    let meter = CpuMeter::new(&[
        ("nats", server.pid()),
        ("scheduler", scheduler.pid()),
        ("worker_1", w1.pid()),
        ("worker_2", w2.pid()),
    ]);
    let rss_start = rss_kb_of(w1.pid()) + rss_kb_of(w2.pid());
    let peak = Arc::new(AtomicU64::new(rss_start));
    let (p2, pids) = (Arc::clone(&peak), (w1.pid(), w2.pid()));
    let sampler = tokio::spawn(async move {
        loop {
            p2.fetch_max(rss_kb_of(pids.0) + rss_kb_of(pids.1), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (before, t0) = (meter.sample(), Instant::now());
    let phase = group_phase(&js, &conns, body, window, seconds, &meter).await?;
    let (jobs_rate, drained_s, total_jobs, through_rate) =
        (phase.rate, phase.drained_s, phase.total, phase.through_rate);
    let produced = phase.produced;
    let cpu = meter.usage(&before, t0.elapsed(), jobs_rate);
    sampler.abort();
    let rss_peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "workers: {jobs_rate:.0} jobs/s ({:.2} of the scheduler alone; producer {:.0}/s); drained {drained_s:.1} s after; {total_jobs} jobs; cpu {cpu}",
        jobs_rate / alone.rate,
        produced.rate
    );
    // 3. Schedule-to-done latency at half the rate: the results of that phase.
    let rate = (jobs_rate / 2.0).max(100.0);
    let from_seq = js
        .get_stream("TS_RESULTS")
        .await?
        .info()
        .await?
        .state
        .last_sequence
        + 1;
    let _ = open_loop(&conns, body, PROCESSES, rate, seconds.min(4.0)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stream = js.get_stream("TS_RESULTS").await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from_seq,
            },
            ..Default::default()
        })
        .await?;
    let mut lat: Vec<Duration> = Vec::new();
    let pending = consumer.cached_info().num_pending;
    if pending > 0 {
        let mut msgs = consumer.messages().await?;
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), msgs.next()).await {
            let m = m?;
            let left = m.info().map(|i| i.pending).unwrap_or(0);
            if let Ok(ev) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
                if let (Some(ts), Some(at)) =
                    (ev["scheduled_ms"].as_u64(), ev["started_ms"].as_u64())
                {
                    lat.push(Duration::from_millis(at.saturating_sub(ts)));
                }
            }
            if left == 0 {
                break;
            }
        }
    }
    lat.sort();
    let (p50, p99) = (percentile_ms(&lat, 0.5), percentile_ms(&lat, 0.99));
    eprintln!(
        "schedule to start at {rate:.0}/s: p50 {p50} ms, p99 {p99} ms ({} jobs)",
        lat.len()
    );
    // 4. The cost of an execution key: a paused group's backlog of jobs, drained by
    // the two instances once resumed, without and then with a key per job (every key
    // distinct: what is measured is the lease's writes, not waiting).
    let backlog = ((jobs_rate * 2.0) as u64).clamp(2_000, 20_000);
    let plain = drain_backlog(&js, &conns, body, backlog, window, false).await?;
    let keyed = drain_backlog(&js, &conns, body, backlog, window, true).await?;
    eprintln!(
        "execution keys: a backlog of {backlog} jobs drained at {plain:.0} jobs/s without, {keyed:.0} jobs/s with a key per job ({:.2})",
        keyed / plain
    );
    // 5. Strict ordering: the same two instances' worth, as a strict group (a
    // process's jobs one at a time, in slot order), the unordered group stopped.
    let (mut w1, mut w2) = (w1, w2);
    let _ = tokio::task::spawn_blocking(move || {
        w1.terminate(Duration::from_secs(20));
        w2.terminate(Duration::from_secs(20));
    })
    .await;
    let strict_flags = ["--ordering", "strict"];
    let _s1 = spawn("bench-strict", &strict_flags, 1)?;
    let _s2 = spawn("bench-strict", &strict_flags, 2)?;
    tests::support::wait_for_service(&probe, "turnstile-worker", 2).await?;
    tokio::time::sleep(Duration::from_secs(4)).await; // the feeder's and partitions' leases
    let strict = group_phase(&js, &conns, body, window, seconds, &meter).await?;
    eprintln!(
        "strict: {:.0} jobs/s (unordered {jobs_rate:.0}); drained {:.1} s after; {} jobs",
        strict.rate, strict.drained_s, strict.total
    );
    // 6. The ceiling: what NATS alone does with the operations a job costs on the
    // work path, on this server, now (no turnstile process involved).
    let ceiling_jobs = ((seconds * 10_000.0) as u64).clamp(20_000, 200_000);
    let ceiling = work_ceiling(&server.url_as(Role::Operator), body, ceiling_jobs).await?;
    eprintln!(
        "work path ceiling (NATS alone): {ceiling:.0} jobs/s over {ceiling_jobs}; end to end {:.2} of it, start → done {:.2}",
        jobs_rate / ceiling,
        through_rate / ceiling
    );
    Ok(json!({
        "work_path_ceiling": {
            "jobs_per_s": ceiling.round(),
            "jobs": ceiling_jobs,
            "end_to_end_vs_ceiling": (jobs_rate / ceiling * 1000.0).round() / 1000.0,
            "start_to_drained_vs_ceiling": (through_rate / ceiling * 1000.0).round() / 1000.0,
            "what": "publish to a work-queue stream with a message id on a subject per partition (pipelined), two pull consumers of one filtered durable on their own connections, each delivered message: a result published with its own message id on a subject of its own (pipelined per fetched batch), then acked",
        },
        "exec_keys": {
            "backlog": backlog,
            "plain_per_s": plain.round(),
            "keyed_per_s": keyed.round(),
            "keyed_vs_plain": (keyed / plain * 1000.0).round() / 1000.0,
        },
        "scheduler_alone_per_s": alone.rate.round(),
        "jobs_per_s": jobs_rate.round(),
        "jobs_vs_scheduler_alone": (jobs_rate / alone.rate * 1000.0).round() / 1000.0,
        "producer_per_s": produced.rate.round(),
        "drained_after_s": (drained_s * 10.0).round() / 10.0,
        "jobs_total": total_jobs,
        "jobs_per_s_start_to_drained": through_rate.round(),
        "cpu": cpu,
        "cpu_while_producing": phase.cpu_measured,
        "latency_at_half_rate": {"rate": rate.round(), "p50_ms": p50, "p99_ms": p99, "jobs": lat.len()},
        "strict": {
            "jobs_per_s": strict.rate.round(),
            "vs_unordered": (strict.rate / jobs_rate.max(1.0) * 1000.0).round() / 1000.0,
            "drained_after_s": (strict.drained_s * 10.0).round() / 10.0,
            "jobs_total": strict.total,
            "jobs_per_s_start_to_drained": strict.through_rate.round(),
        },
        "workers_rss_mb": {"start": rss_start / 1024, "peak": rss_peak / 1024},
        "instances": 2,
        "handler": "noop (Rust)",
        "buffer": "bounded:1024",
        "targets": {"jobs_per_s_min": 35000},
        "meets_target": jobs_rate >= 35000.0,
    }))
}

/// The work path's ceiling: the NATS operations one job costs between the log and its
/// result — a publish to a work-queue stream with a `Nats-Msg-Id` (on a subject per
/// partition), its delivery to one of two pull consumers of one filtered durable (each
/// on its own connection, as the two instances), a result published with its own
/// `Nats-Msg-Id` to a subject of its own in a second stream, and the ack — done by this
/// process alone, as fast as pipelining allows (publishes with 1,024 in flight; each
/// fetched batch's results published together, then acked). Returns jobs/s from the
/// first publish until the last result is stored. The streams are removed after.
async fn work_ceiling(url: &str, body: &Bytes, n: u64) -> Result<f64> {
    use async_nats::jetstream::{consumer, stream};
    let js = async_nats::jetstream::new(tests::support::connect(url).await?);
    for (name, subjects, retention) in [
        (
            "CEIL_WORK",
            "ceil.work.>",
            stream::RetentionPolicy::WorkQueue,
        ),
        (
            "CEIL_RESULTS",
            "ceil.result.>",
            stream::RetentionPolicy::Limits,
        ),
    ] {
        let _ = js.delete_stream(name).await;
        js.create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subjects.into()],
            retention,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await?;
    }
    js.get_stream("CEIL_WORK")
        .await?
        .create_consumer(consumer::pull::Config {
            durable_name: Some("ceiling".into()),
            // Filtered, as a group's consumer is (the stream is every group's).
            filter_subject: "ceil.work.g.>".into(),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await?;
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let js = async_nats::jetstream::new(tests::support::connect(url).await?);
        let (done, body) = (Arc::clone(&done), body.clone());
        consumers.push(tokio::spawn(async move {
            let c: consumer::PullConsumer = js
                .get_stream("CEIL_WORK")
                .await?
                .get_consumer("ceiling")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            while done.load(Ordering::Relaxed) < n {
                let mut batch = c
                    .fetch()
                    .max_messages(256)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await?;
                let mut got = Vec::new();
                while let Some(m) = batch.next().await {
                    got.push(m.map_err(|e| anyhow::anyhow!("{e}"))?);
                }
                let mut acks = Vec::with_capacity(got.len());
                for m in &got {
                    // As an instance records a job: a subject per job, an id per job.
                    let job = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.to_string())
                        .unwrap_or_default();
                    let id = format!("{job}:1:Done");
                    let subject = format!("ceil.result.g.{}", job.replace(':', "."));
                    let publish = async_nats::jetstream::message::PublishMessage::build()
                        .payload(body.clone())
                        .message_id(id);
                    acks.push(js.send_publish(subject, publish).await?);
                }
                for a in acks {
                    a.await?;
                }
                for m in &got {
                    m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                }
                done.fetch_add(got.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let window = Arc::new(Semaphore::new(1024));
    for i in 0..n {
        let permit = Arc::clone(&window).acquire_owned().await?;
        // As the feeder hands out a job: a subject per partition of the group.
        let subject = format!("ceil.work.g.{}", i % 16);
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(body.clone())
            .message_id(format!("p{}:{i}", i % PROCESSES as u64));
        let ack = js.send_publish(subject, publish).await?;
        tokio::spawn(async move {
            let _ = ack.await;
            drop(permit);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while done.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    for c in consumers {
        c.abort();
    }
    for name in ["CEIL_WORK", "CEIL_RESULTS"] {
        let _ = js.delete_stream(name).await;
    }
    Ok(rate)
}

/// Pauses the `bench` group, schedules `n` jobs (each with its own execution key if
/// `keyed`), waits until the group holds or has them all waiting, resumes it and
/// returns the jobs/s from the resume until all are recorded.
async fn drain_backlog(
    js: &async_nats::jetstream::Context,
    conns: &[async_nats::Client],
    body: &Bytes,
    n: u64,
    window: usize,
    keyed: bool,
) -> Result<f64> {
    let control = js.get_key_value("TS_WORKERS").await?;
    control.put("pause.bench", Bytes::from("bench")).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tag = uuid_like();
    let mut inboxes = Vec::new();
    for c in conns {
        inboxes.push(Arc::new(inbox(c).await?));
    }
    let permits = Arc::new(Semaphore::new(window));
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let ci = (i as usize) % conns.len();
        let subject = format!("ts.schedule.x{tag}-{}", i as usize % PROCESSES);
        let headers = keyed.then(|| {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Ts-Execution-Key", format!("{tag}-{i}").as_str());
            h
        });
        let (client, inbox, body) = (conns[ci].clone(), inboxes[ci].clone(), body.clone());
        tokio::spawn(async move {
            let _ = send_with(&client, &inbox, i, subject, headers, body).await;
            drop(permit);
        });
    }
    let _ = permits.acquire_many(window as u32).await?;
    let work = js.get_stream("TS_WORK").await?;
    let fed = Instant::now();
    loop {
        let i = work.consumer_info("group-bench").await?;
        if i.num_pending + i.num_ack_pending as u64 >= n || fed.elapsed() > Duration::from_secs(120)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r0 = stream_messages(js, "TS_RESULTS").await?;
    control.delete("pause.bench").await?;
    let t0 = Instant::now();
    while stream_messages(js, "TS_RESULTS").await? < r0 + n
        && t0.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = stream_messages(js, "TS_RESULTS").await? - r0;
    Ok(done as f64 / t0.elapsed().as_secs_f64())
}

fn print_workers_table(w: &serde_json::Value) {
    if w.is_null() {
        return;
    }
    println!("\n| workers (2 instances, no-op handler, 1,000 processes) | value |");
    println!("|---|---|");
    println!(
        "| scheduler alone (assignments/s) | {} |",
        w["scheduler_alone_per_s"]
    );
    println!(
        "| end to end (jobs/s; target ≥ 35,000) | {} ({} of the scheduler alone) {} |",
        w["jobs_per_s"],
        w["jobs_vs_scheduler_alone"],
        if w["meets_target"].as_bool() == Some(true) {
            "✓"
        } else {
            "✗"
        }
    );
    println!(
        "| work path ceiling, NATS alone (jobs/s; end to end vs it; start → done vs it) | {} ({}; {}) |",
        w["work_path_ceiling"]["jobs_per_s"],
        w["work_path_ceiling"]["end_to_end_vs_ceiling"],
        w["work_path_ceiling"]["start_to_drained_vs_ceiling"]
    );
    println!(
        "| drained after the producer stopped (s) | {} |",
        w["drained_after_s"]
    );
    println!(
        "| all {} jobs, producer start → last done (jobs/s) | {} |",
        w["jobs_total"], w["jobs_per_s_start_to_drained"]
    );
    println!(
        "| schedule → start at {} /s: p50 / p99 (ms) | {} / {} |",
        w["latency_at_half_rate"]["rate"],
        w["latency_at_half_rate"]["p50_ms"],
        w["latency_at_half_rate"]["p99_ms"]
    );
    println!(
        "| strict ordering (jobs/s; vs unordered) | {} ({}); start → last done {} |",
        w["strict"]["jobs_per_s"],
        w["strict"]["vs_unordered"],
        w["strict"]["jobs_per_s_start_to_drained"]
    );
    println!(
        "| worker RSS, start → peak (MB, bounded:1024) | {} → {} |",
        w["workers_rss_mb"]["start"], w["workers_rss_mb"]["peak"]
    );
    println!(
        "| a paused backlog of {} jobs drained: without / with an execution key per job (jobs/s) | {} / {} ({}) |",
        w["exec_keys"]["backlog"],
        w["exec_keys"]["plain_per_s"],
        w["exec_keys"]["keyed_per_s"],
        w["exec_keys"]["keyed_vs_plain"]
    );
    println!("| CPU (cores), the whole phase | {} |", w["cpu"]);
    println!(
        "| CPU (cores), the measured seconds alone (producer running; µs per job stored) | {} |",
        w["cpu_while_producing"]
    );
}
