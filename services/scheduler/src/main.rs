//! `scheduler`: the turnstile scheduler service. See the library for the parts.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use service::runtime::{connect, Identity};

use protocol::wire::Mode;
use scheduler::{Config, Keyring};

// glibc malloc serialises on its arena locks under this many small allocations per
// request; mimalloc measured faster in `make bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The turnstile scheduler: gives each message the next slot of its process and
/// appends signed, hash-chained assignments to the log.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    nats: service::runtime::NatsArgs,
    /// Intake connections: every endpoint subscribes on each (one queue group), so
    /// requests are read in parallel and a burst meets the server's per-connection
    /// `max_pending` once per connection.
    #[arg(long, env = "TS_INTAKE_CONNECTIONS", default_value_t = scheduler::DEFAULT_INTAKE_CONNECTIONS)]
    intake_connections: usize,
    /// NATS server URL(s) of the replies connection (publishes the answers, subscribes
    /// to nothing: user `scheduler-replies`); may carry `user:password@`. Default: none,
    /// the answers leave on the intake connection.
    #[arg(long, env = "TS_REPLIES_URL")]
    replies_url: Option<String>,
    /// NATS credentials file of the replies connection.
    #[arg(long, env = "TS_REPLIES_CREDS")]
    replies_creds: Option<PathBuf>,
    /// Key file(s) made by `turnstile keygen`; the first is the default signer.
    #[arg(long = "key", env = "TS_KEYS", value_delimiter = ',', required = true)]
    keys: Vec<String>,
    /// Mode of requests that name none: aggressive, local_confirmation, remote_confirmation, disabled.
    #[arg(long, env = "TS_DEFAULT_MODE", default_value = "local_confirmation")]
    default_mode: String,
    /// Largest message body in bytes.
    #[arg(long, env = "TS_MAX_BODY", default_value_t = 1024 * 1024)]
    max_body: usize,
    /// Idempotency window for message ids, in seconds.
    #[arg(long, env = "TS_DEDUPE_WINDOW_SECS", default_value_t = 600)]
    dedupe_window_secs: u64,
    /// A request that waited longer than this in its process's queue is answered
    /// `busy` (retry) instead of being scheduled late.
    #[arg(long, env = "TS_MAX_QUEUE_WAIT_MS", default_value_t = 5000)]
    max_queue_wait_ms: u64,
    /// On SIGTERM, how long the requests already taken are still written; then what is
    /// left is answered `unavailable` (the process exits within about this + 5 s).
    #[arg(long, env = "TS_DRAIN_MS", default_value_t = 12_000)]
    drain_ms: u64,
    /// Most assignments per run (one log write).
    #[arg(long, default_value_t = 1000)]
    max_run_entries: usize,
    /// Stream (mirror/source of the log) that remote_confirmation waits for.
    #[arg(long, env = "TS_REMOTE_STREAM")]
    remote_stream: Option<String>,
    /// JetStream domain of the remote stream.
    #[arg(long, env = "TS_REMOTE_DOMAIN")]
    remote_domain: Option<String>,
    /// Runs written as pipelined single publishes at once; the backlog beyond goes as
    /// atomic batches. 16-32 suit a server with `sync_interval: always`.
    #[arg(long, env = "TS_SINGLES_IN_FLIGHT", default_value_t = 256)]
    singles_in_flight: usize,
    /// Replicas of the log stream when this scheduler creates it.
    #[arg(long, env = "TS_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// Testing aid (fault injection, `make chaos`): run with the system clock shifted
    /// by this many milliseconds (negative: behind).
    #[arg(
        long,
        env = "TS_CLOCK_SKEW_MS",
        default_value_t = 0,
        allow_hyphen_values = true,
        hide = true
    )]
    clock_skew_ms: i64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // One line for an operator (or a supervisor's log) to act on: the whole cause
    // chain, no debug dump.
    match start().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scheduler: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn start() -> anyhow::Result<()> {
    service::runtime::init_tracing();
    let args = Args::parse();
    let default_mode: Mode = args.default_mode.parse()?;
    let config = Config {
        prefix: args.nats.prefix.clone(),
        default_mode,
        max_body: args.max_body,
        dedupe_window: Duration::from_secs(args.dedupe_window_secs),
        max_run_entries: args.max_run_entries,
        max_queue_wait: Duration::from_millis(args.max_queue_wait_ms.max(1)),
        drain: Duration::from_millis(args.drain_ms),
        remote_stream: args.remote_stream,
        remote_domain: args.remote_domain,
        replicas: args.replicas,
        singles_in_flight: args.singles_in_flight,
        ..Config::default()
    };
    let keyring = Keyring::from_files(&args.keys)?;
    let events = scheduler::ConnectionsEvents::default();
    let core = args
        .nats
        .core("turnstile-scheduler", &events.core, None)
        .await?;
    // The intake identity takes requests on one connection and answers on another.
    let intake_identity = args.nats.intake();
    if !intake_identity.is_given() {
        tracing::warn!("no intake identity (TS_INTAKE_URL / TS_INTAKE_CREDS): client requests are taken and answered with the core user's rights");
    }
    let (intake_url, intake_creds) = intake_identity.resolve(&args.nats.nats_url)?;
    let mut intake = Vec::new();
    for _ in 0..args.intake_connections.max(1) {
        intake.push(
            connect(
                "turnstile-scheduler-intake",
                &intake_url,
                intake_creds.as_deref(),
                &events.intake,
                Some(scheduler::INTAKE_SUBSCRIPTION_CAPACITY),
            )
            .await?,
        );
    }
    let replies_identity = Identity {
        url: args.replies_url,
        creds: args.replies_creds,
    };
    let replies = if replies_identity.is_given() {
        let (url, creds) = replies_identity.resolve(&args.nats.nats_url)?;
        let name = "turnstile-scheduler-replies";
        Some(connect(name, &url, creds.as_deref(), &events.replies, None).await?)
    } else {
        None
    };
    let shutdown = service::runtime::shutdown_on_signals();
    let connections = scheduler::Connections {
        core,
        intake,
        replies,
        events,
    };
    if args.clock_skew_ms != 0 {
        tracing::warn!(
            skew_ms = args.clock_skew_ms,
            "clock skewed on purpose (--clock-skew-ms)"
        );
    }
    let clock = scheduler::skewed_clock(args.clock_skew_ms);
    scheduler::run_with_clock(config, keyring, connections, shutdown, clock).await?;
    Ok(())
}
