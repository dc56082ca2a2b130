//! `worker`: one instance of a turnstile worker group. See the library for the parts.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use protocol::ProcessId;
use worker::feeder::{From, Serves};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A turnstile worker instance: runs the jobs of the assignment log for its group.
/// Start more instances of the same group to scale it out.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    nats: service::runtime::NatsArgs,
    /// The worker group (1–48 of A-Z a-z 0-9 - _).
    #[arg(long, env = "TS_GROUP")]
    group: String,
    /// Serve these processes only (comma-separated).
    #[arg(long, env = "TS_PROCESSES", value_delimiter = ',')]
    processes: Vec<String>,
    /// Serve the processes whose id starts with this.
    #[arg(long, env = "TS_PROCESS_PREFIX", conflicts_with = "processes")]
    process_prefix: Option<String>,
    /// A new group also runs every assignment already in the log (default: only
    /// what is scheduled from its creation on).
    #[arg(long, env = "TS_FROM_START")]
    from_start: bool,
    /// The buffer: `queue`, `bounded:<n>` or `dropbox` (merge key: --merge-header,
    /// keep-newest).
    #[arg(long, env = "TS_BUFFER", default_value = "bounded:256")]
    buffer: worker::buffer::Kind,
    /// `unordered` (any concurrency) or `strict` (a process's jobs one at a time, in
    /// slot order, across the group; processes in parallel). Every instance of a group
    /// must say the same.
    #[arg(long, env = "TS_ORDERING", default_value = "unordered")]
    ordering: worker::instance::Order,
    /// Jobs run at once by this instance.
    #[arg(long, env = "TS_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// Attempts before a job is dead.
    #[arg(long, env = "TS_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    /// First retry delay (ms), doubled per attempt up to --backoff-max-ms.
    #[arg(long, env = "TS_BACKOFF_MS", default_value_t = 1_000)]
    backoff_ms: u64,
    /// Longest retry delay (ms).
    #[arg(long, env = "TS_BACKOFF_MAX_MS", default_value_t = 60_000)]
    backoff_max_ms: u64,
    /// An attempt running longer is ended (ms).
    #[arg(long, env = "TS_JOB_TIMEOUT_MS", default_value_t = 300_000)]
    job_timeout_ms: u64,
    /// How long a job an instance holds stays its own without a sign of life (ms).
    #[arg(long, env = "TS_ACK_WAIT_MS", default_value_t = 30_000)]
    ack_wait_ms: u64,
    /// On SIGTERM, how long running jobs may take before they are handed back (ms).
    #[arg(long, env = "TS_DRAIN_MS", default_value_t = 10_000)]
    drain_ms: u64,
    /// The header holding a job's merge key (dropbox).
    #[arg(long, env = "TS_MERGE_HEADER", default_value = "Merge-Key")]
    merge_header: String,
    /// The feeder's lease, and in a strict group each work partition's (ms): a dead
    /// instance's share is taken over after about this long.
    #[arg(long, env = "TS_LEASE_MS", default_value_t = 10_000)]
    lease_ms: u64,
    /// The lease on an execution key (ms): a key held by an instance that died frees
    /// this long after its last renewal (renewed every third of it).
    #[arg(long, env = "TS_EXEC_KEY_LEASE_MS", default_value_t = 15_000)]
    exec_key_lease_ms: u64,
    /// Replicas of the work and results streams when this instance creates them.
    #[arg(long, env = "TS_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// The handler: run this program per job (body on stdin; exit 0 done, 75 retry,
    /// anything else failed).
    #[arg(long, env = "TS_COMMAND", required_unless_present_any = ["noop", "http"], num_args = 1.., allow_hyphen_values = true)]
    command: Vec<String>,
    /// The handler: POST each job to this URL (http://; 2xx done, 429/503 retry after
    /// Retry-After, anything else failed).
    #[arg(long, env = "TS_HTTP", conflicts_with = "command")]
    http: Option<String>,
    /// Benchmarks: a handler that does nothing (every job done at once).
    #[arg(long, hide = true)]
    noop: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match start().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn start() -> anyhow::Result<()> {
    service::runtime::init_tracing();
    let args = Args::parse();
    let serves = if let Some(p) = args.process_prefix {
        Serves::Prefix(p)
    } else if !args.processes.is_empty() {
        Serves::List(
            args.processes
                .iter()
                .map(|p| ProcessId::new(p.clone()))
                .collect::<Result<_, _>>()?,
        )
    } else {
        Serves::All
    };
    let events = Arc::new(service::ConnectionEvents::default());
    let core = args.nats.core("turnstile-worker", &events, None).await?;
    let intake = args
        .nats
        .intake_if_given(
            "turnstile-worker-intake",
            &events,
            "the services API answers on the core connection, in its account only",
        )
        .await?;
    let shutdown = service::runtime::shutdown_on_signals();
    let handler: Arc<dyn worker::handler::Handler> = if args.noop {
        Arc::new(
            |_job: worker::job::Job, _cancel: tokio_util::sync::CancellationToken| async {
                worker::handler::Outcome::Done
            },
        )
    } else if let Some(url) = &args.http {
        Arc::new(worker::handler::Http::new(url).map_err(|e| anyhow::anyhow!(e))?)
    } else {
        let (program, rest) = args
            .command
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("--command needs a program"))?;
        Arc::new(worker::handler::Command::new(
            program.clone(),
            rest.to_vec(),
        ))
    };
    let settings = worker::Settings {
        prefix: args.nats.prefix,
        replicas: args.replicas,
        serves,
        from: if args.from_start {
            From::Start
        } else {
            From::New
        },
        instance: worker::instance::Config {
            group: args.group,
            buffer: args.buffer,
            concurrency: args.concurrency.max(1),
            max_attempts: args.max_attempts.max(1),
            backoff_initial: Duration::from_millis(args.backoff_ms),
            backoff_max: Duration::from_millis(args.backoff_max_ms.max(args.backoff_ms)),
            job_timeout: Duration::from_millis(args.job_timeout_ms.max(1)),
            ack_wait: Duration::from_millis(args.ack_wait_ms.max(1_000)),
            drain: Duration::from_millis(args.drain_ms),
            merge_header: args.merge_header,
            order: args.ordering,
            lease: Duration::from_millis(args.lease_ms.max(1_000)),
            replicas: args.replicas,
            exec_key_lease: Duration::from_millis(args.exec_key_lease_ms.max(1_000)),
        },
        lease: Duration::from_millis(args.lease_ms.max(1_000)),
        trusted: None,
    };
    worker::run(
        settings,
        worker::Connections {
            core,
            intake,
            events,
        },
        handler,
        shutdown,
        service::system_clock(),
    )
    .await?;
    Ok(())
}
