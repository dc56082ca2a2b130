//! `turnstile`: the command-line client. Schedules messages, reads and tails the
//! assignment log, verifies it against the published keys, makes key files,
//! edits per-process settings, sets and inspects alarms and cron jobs (the
//! alarm-loader) and shows the next fire times of cron schedules. Everything it does
//! is plain NATS (`cron next` of an expression needs no server); see `schemas/`.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use serde_json::json;

use journal::client::{Client, Schedule};
use journal::reader::LogReader;
use journal::subjects::Subjects;
use journal::{keyring, setup};
use protocol::keys::{KeyFile, Keypair};
use protocol::wire::{Entry, Mode, ProcessConfig, Receipt};
use protocol::ProcessId;

mod alarm;
mod audit;
mod cron;
mod jobs;
mod verify;

// `verify` receives every run into a fresh buffer of up to 512 KiB and frees it soon
// after: glibc returns such memory to the system and faults it in again each time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "turnstile: schedule messages, read and verify the assignment log"
)]
struct Cli {
    #[command(flatten)]
    nats_url: NatsArgs,
    /// Subject prefix of the turnstile deployment.
    #[arg(long, global = true, env = "TS_PREFIX", default_value = "ts")]
    prefix: String,
    #[command(subcommand)]
    command: Command,
}

/// Where and as whom to connect.
#[derive(clap::Args, Debug)]
struct NatsArgs {
    /// NATS server URL(s), as the nats CLI reads it; `nats://user:password@host:4222`
    /// connects as that user (operator commands: see README).
    #[arg(
        long = "nats-url",
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    url: String,
    /// NATS credentials file (JWT and nkey seed) to connect with.
    #[arg(long, global = true, env = "NATS_CREDS")]
    creds: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a new signing key file (keep it secret; the scheduler publishes the public half).
    Keygen {
        /// Write the key here (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write the public key file here.
        #[arg(long)]
        public_out: Option<PathBuf>,
    },
    /// Schedule one message; prints the receipt as JSON.
    Schedule {
        /// The process.
        process: String,
        /// The body (default: standard input).
        #[arg(long, short)]
        data: Option<String>,
        /// Message id, for idempotent retries.
        #[arg(long)]
        id: Option<String>,
        /// aggressive, local_confirmation, remote_confirmation or disabled.
        #[arg(long)]
        mode: Option<String>,
        /// A header to store with the message, NAME=VALUE (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Queue key (Ts-Queue-Key): refused queue_key_held while a job of the
        /// process with this key has not started.
        #[arg(long)]
        queue_key: Option<String>,
    },
    /// The current slot and chain head of a process.
    Slot {
        /// The process.
        process: String,
    },
    /// Print assignments in slot order, one JSON object a line.
    Log {
        /// The process.
        process: String,
        /// First slot.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Last slot (inclusive).
        #[arg(long)]
        to: Option<u64>,
        /// Keep printing new assignments as they are written.
        #[arg(long)]
        follow: bool,
        /// Print the body as text (lossy UTF-8) instead of hex.
        #[arg(long)]
        text: bool,
    },
    /// Verify a process's log, or every process's (--all), to the end of each subject:
    /// every fault with its stream sequence, slot, code and what is wrong.
    Verify(verify::Args),
    /// Follow the live feed of fault events (--follow).
    Audit(audit::Args),
    /// Per-process settings.
    Process {
        #[command(subcommand)]
        action: ProcessAction,
    },
    /// List the published scheduler keys.
    Keys,
    /// Alarms: messages due at a time, scheduled into a process's log or sent to a
    /// subject by the alarm-loader. Exit status 1: the loader refused (the reason on
    /// standard error).
    Alarm {
        #[command(subcommand)]
        action: alarm::Action,
    },
    /// Cron jobs kept by the alarm-loader (add, delete, activate, deactivate, get,
    /// list; exit status 1: the loader refused, the reason on standard error), and the
    /// next fire times of a schedule (`next`: an expression needs no server).
    Cron {
        #[command(subcommand)]
        action: cron::Action,
    },
    /// The worker groups and their live instances, one JSON object a group.
    Workers,
    /// One worker instance (`inspect <id>`).
    Worker {
        #[command(subcommand)]
        action: jobs::WorkerAction,
    },
    /// Pause or resume a worker group's queue, or one process of it (the operator's).
    Queue {
        #[command(subcommand)]
        action: jobs::QueueAction,
    },
    /// One job in a worker group: its history, or cancel it (the operator's).
    Job {
        #[command(subcommand)]
        action: jobs::JobAction,
    },
    /// The jobs of a process in a worker group, each with its last event (one JSON
    /// object a line, in slot order).
    Jobs {
        /// The worker group.
        group: String,
        /// The process.
        process: String,
        /// Only jobs whose last event is this state (done, failed, dead, cancelled,
        /// merged).
        #[arg(long)]
        state: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ProcessAction {
    /// Set a process's default mode and required keys.
    Set {
        /// The process.
        process: String,
        /// Default mode (disabled refuses every request).
        #[arg(long)]
        mode: Option<String>,
        /// Key ids that must all sign (comma-separated).
        #[arg(long, value_delimiter = ',')]
        keys: Vec<String>,
    },
    /// Show a process's settings.
    Get {
        /// The process.
        process: String,
    },
    /// Remove a process's settings (back to the defaults).
    Clear {
        /// The process.
        process: String,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("turnstile: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Connects with the URL's `user:password@` (or `token@`; async-nats 0.51 ignores them
/// in a URL) or the credentials file; neither: as the server's anonymous client.
async fn connect(nats: &NatsArgs) -> Result<async_nats::Client> {
    let (urls, auth) = journal::url::split_credentials(&nats.url)?;

    let mut options = async_nats::ConnectOptions::new()
        .name("turnstile-cli")
        .event_callback(|event| async move {
            // A refused publish or request is never answered: say why at once.
            if let async_nats::Event::ServerError(e) = event {
                eprintln!("turnstile: {e} (connect as another user: NATS_URL or --creds)");
            }
        });
    if let Some(path) = &nats.creds {
        if auth.is_some() {
            bail!("give credentials either in NATS_URL or with --creds, not both");
        }
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("reading NATS credentials {}", path.display()))?;
    }
    if let Some(auth) = auth {
        options = auth.apply(options);
    }
    // async-nats takes a comma-separated string as one (invalid) address.
    let servers: Vec<&str> = urls.split(',').collect();
    let client = options
        .connect(servers)
        .await
        .with_context(|| format!("connecting to {urls} (set NATS_URL)"))?;
    setup::check_server(&client)?;
    Ok(client)
}

async fn run(cli: Cli) -> Result<i32> {
    let subjects = Subjects::new(&cli.prefix)?;
    match cli.command {
        Command::Keygen { out, public_out } => {
            let kp = Keypair::generate();
            let text = kp.to_key_file();
            match out {
                Some(path) => {
                    write_private(&path, &text)?;
                    eprintln!("wrote key {} to {}", kp.id(), path.display());
                }
                None => print!("{text}"),
            }
            if let Some(path) = public_out {
                let public = KeyFile {
                    key_id: kp.id().into(),
                    public_key: hex::encode(kp.public_key()),
                    secret_seed: None,
                };
                std::fs::write(&path, serde_json::to_string_pretty(&public)? + "\n")?;
            }
            Ok(0)
        }
        Command::Schedule {
            process,
            data,
            id,
            mode,
            headers,
            queue_key,
        } => {
            let process = ProcessId::new(process)?;
            let body = match data {
                Some(d) => Bytes::from(d),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf)?;
                    Bytes::from(buf)
                }
            };
            let mode = mode.map(|m| m.parse::<Mode>()).transpose()?;
            let headers = headers
                .iter()
                .map(|h| {
                    h.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .context("headers are NAME=VALUE")
                })
                .collect::<Result<Vec<_>>>()?;
            let mut headers = headers;
            if let Some(k) = queue_key {
                headers.push((journal::subjects::QUEUE_KEY.to_string(), k));
            }
            let client = Client::new(connect(&cli.nats_url).await?, subjects);
            let receipt = client
                .schedule(
                    &process,
                    body,
                    &Schedule {
                        message_id: id,
                        mode,
                        headers,
                    },
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&receipt_json(&receipt))?);
            Ok(0)
        }
        Command::Slot { process } => {
            let process = ProcessId::new(process)?;
            let client = Client::new(connect(&cli.nats_url).await?, subjects);
            let info = client.slot(&process).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "process": info.process,
                    "slot": info.slot,
                    "next_slot": info.next_slot,
                    "chain_head": info.chain_head.to_hex(),
                    "timestamp_ms": info.timestamp_ms,
                }))?
            );
            Ok(0)
        }
        Command::Log {
            process,
            from,
            to,
            follow,
            text,
        } => {
            let process = ProcessId::new(process)?;
            let js = async_nats::jetstream::new(connect(&cli.nats_url).await?);
            let store = setup::open_bucket(&js, &subjects.keys_bucket()).await?;
            let trusted = keyring::trust(&keyring::fetch(&store).await?);
            let reader = LogReader::open(js, subjects).await?;
            let mut judged =
                journal::chain::from_slot(&reader, &process, &trusted, from, follow).await?;
            let mut out = std::io::stdout().lock();
            while let Some(item) = judged.next().await {
                let stored = match item? {
                    journal::chain::Judged::Chain { run, lost } => {
                        for f in lost {
                            eprintln!("turnstile: {process}: {f}");
                        }
                        run
                    }
                    journal::chain::Judged::Foreign(f) => {
                        eprintln!("turnstile: {process}: skipping a foreign message: {f}");
                        continue;
                    }
                };
                for e in &stored.run.entries {
                    if e.slot < from {
                        continue;
                    }
                    if to.is_some_and(|t| e.slot > t) {
                        return Ok(0);
                    }
                    writeln!(out, "{}", serde_json::to_string(&entry_json(e, text))?)?;
                }
                out.flush()?;
            }
            Ok(0)
        }
        Command::Verify(args) => verify::run(connect(&cli.nats_url).await?, subjects, args).await,
        Command::Audit(args) => {
            args.check()?;
            audit::run(connect(&cli.nats_url).await?, subjects, args).await
        }
        Command::Process { action } => {
            let nats = connect(&cli.nats_url).await?;
            let js = async_nats::jetstream::new(nats.clone());
            let store = setup::ensure_processes(&js, &subjects, &Default::default()).await?;
            match action {
                ProcessAction::Set {
                    process,
                    mode,
                    keys,
                } => {
                    let process = ProcessId::new(process)?;
                    let mode = mode.map(|m| m.parse::<Mode>()).transpose()?;
                    let config = ProcessConfig { mode, keys };
                    let revision = store.put(process.as_str(), config.encode()?.into()).await?;
                    println!(
                        "{process}: mode={} keys={:?}",
                        mode.map(|m| m.as_str()).unwrap_or("default"),
                        config.keys
                    );
                    // Return once every live replica applies it (or say which did not).
                    let (applied, behind) = journal::client::settings_applied(
                        &nats,
                        revision,
                        std::time::Duration::from_secs(5),
                    )
                    .await?;
                    if !behind.is_empty() {
                        eprintln!(
                            "turnstile: applied by {} scheduler(s); NOT yet applied by: {}",
                            applied.len(),
                            behind.join(", ")
                        );
                        return Ok(1);
                    }
                    eprintln!("applied by {} scheduler(s)", applied.len());
                }
                ProcessAction::Get { process } => {
                    let process = ProcessId::new(process)?;
                    let config = match store.get(process.as_str()).await? {
                        Some(b) => ProcessConfig::decode(&b)?,
                        None => ProcessConfig::default(),
                    };
                    println!(
                        "{process}: mode={} keys={:?}",
                        config.mode.map(|m| m.as_str()).unwrap_or("default"),
                        config.keys
                    );
                }
                ProcessAction::Clear { process } => {
                    let process = ProcessId::new(process)?;
                    store.delete(process.as_str()).await?;
                    println!("{process}: settings cleared");
                }
            }
            Ok(0)
        }
        Command::Alarm { action } => {
            alarm::run(connect(&cli.nats_url).await?, subjects, action).await
        }
        Command::Cron { action } => {
            let nats = if action.needs_server() {
                Some(connect(&cli.nats_url).await?)
            } else {
                None
            };
            cron::run(nats, subjects, action).await
        }
        Command::Workers => jobs::workers(connect(&cli.nats_url).await?).await,
        Command::Worker { action } => {
            jobs::worker(connect(&cli.nats_url).await?, &subjects, action).await
        }
        Command::Queue { action } => {
            jobs::queue(connect(&cli.nats_url).await?, &subjects, action).await
        }
        Command::Job { action } => {
            jobs::job(connect(&cli.nats_url).await?, &subjects, action).await
        }
        Command::Jobs {
            group,
            process,
            state,
        } => {
            jobs::jobs(
                connect(&cli.nats_url).await?,
                &subjects,
                group,
                process,
                state,
            )
            .await
        }
        Command::Keys => {
            let js = async_nats::jetstream::new(connect(&cli.nats_url).await?);
            let store = setup::open_bucket(&js, &subjects.keys_bucket()).await?;
            for k in keyring::fetch(&store).await? {
                println!("{} {}", k.key_id, hex::encode(&k.public_key));
            }
            Ok(0)
        }
    }
}

fn write_private(path: &PathBuf, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist)", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn receipt_json(r: &Receipt) -> serde_json::Value {
    json!({
        "process": r.process,
        "slot": r.slot,
        "message_id": r.message_id,
        "timestamp_ms": r.timestamp_ms,
        "headers": r.headers,
        "body_hash": r.body_hash.to_hex(),
        "prev_hash": r.prev_hash.to_hex(),
        "chain_hash": r.chain_hash.to_hex(),
        "durable": r.durable,
        "duplicate": r.duplicate,
        "run": { "first_slot": r.run_first_slot, "count": r.run_count },
        "merkle_path": r.merkle_path.iter().map(|h| h.to_hex()).collect::<Vec<_>>(),
        "batch": { "size": r.seal.batch_size, "index": r.seal.batch_index },
        "commitments": r.seal.commitments.iter().map(|c| json!({"key_id": c.key_id, "signature": hex::encode(&c.signature)})).collect::<Vec<_>>(),
        "verified": r.check(None).is_ok(),
    })
}

fn entry_json(e: &Entry, text: bool) -> serde_json::Value {
    let body = if text {
        json!(String::from_utf8_lossy(&e.body))
    } else {
        json!(hex::encode(&e.body))
    };
    json!({
        "slot": e.slot,
        "message_id": e.message_id,
        "timestamp_ms": e.timestamp_ms,
        "headers": e.headers,
        "body": body,
        "chain_hash": e.chain_hash.to_hex(),
    })
}
