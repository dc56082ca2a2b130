//! `scheduler`: the turnstile scheduler service. See the library for the parts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tokio_util::sync::CancellationToken;

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
    /// NATS server URL(s), comma-separated, of the core connection (writes the log and
    /// the buckets: user `scheduler` in deploy/accounts.conf); may carry `user:password@`.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file of the core connection.
    #[arg(long, env = "NATS_CREDS")]
    creds: Option<PathBuf>,
    /// NATS server URL(s) of the intake connection (takes client requests, publishes only
    /// replies: user `scheduler-intake`); may carry `user:password@`. Default: the core URL.
    #[arg(long, env = "TS_INTAKE_URL")]
    intake_url: Option<String>,
    /// NATS credentials file of the intake connection.
    #[arg(long, env = "TS_INTAKE_CREDS")]
    intake_creds: Option<PathBuf>,
    /// Intake connections: every endpoint subscribes on each (one queue group), so
    /// requests are read in parallel and a burst meets the server's per-connection
    /// `max_pending` once per connection.
    #[arg(long, env = "TS_INTAKE_CONNECTIONS", default_value_t = 2)]
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
    /// Subject prefix.
    #[arg(long, env = "TS_PREFIX", default_value = "ts")]
    prefix: String,
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

/// The system clock shifted by a fixed number of milliseconds (`--clock-skew-ms`).
struct SkewedClock(i64);

impl scheduler::Clock for SkewedClock {
    fn now_ms(&self) -> u64 {
        scheduler::SystemClock
            .now_ms()
            .saturating_add_signed(self.0)
    }
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let default_mode: Mode = args.default_mode.parse()?;
    let config = Config {
        prefix: args.prefix,
        default_mode,
        max_body: args.max_body,
        dedupe_window: Duration::from_secs(args.dedupe_window_secs),
        max_run_entries: args.max_run_entries,
        max_queue_wait: Duration::from_millis(args.max_queue_wait_ms.max(1)),
        remote_stream: args.remote_stream,
        remote_domain: args.remote_domain,
        replicas: args.replicas,
        singles_in_flight: args.singles_in_flight,
        ..Config::default()
    };
    let keyring = Keyring::from_files(&args.keys)?;
    let events = scheduler::ConnectionsEvents::default();
    let core = connect(
        "turnstile-scheduler",
        &args.nats_url,
        args.creds.as_deref(),
        &events.core,
        None,
    )
    .await?;
    // The intake identity takes requests on one connection and answers on another.
    let (intake_url, intake_creds) = if args.intake_url.is_none() && args.intake_creds.is_none() {
        tracing::warn!("no intake identity (TS_INTAKE_URL / TS_INTAKE_CREDS): client requests are taken and answered with the core user's rights");
        (args.nats_url.clone(), args.creds.as_deref())
    } else {
        let url = args.intake_url.as_deref().unwrap_or(&args.nats_url);
        // Intake credentials given as a file replace any in the core URL.
        let url = match (&args.intake_url, &args.intake_creds) {
            (None, Some(_)) => journal::url::split_credentials(url)?.0,
            _ => url.to_string(),
        };
        (url, args.intake_creds.as_deref())
    };
    let mut intake = Vec::new();
    for _ in 0..args.intake_connections.max(1) {
        intake.push(
            connect(
                "turnstile-scheduler-intake",
                &intake_url,
                intake_creds,
                &events.intake,
                Some(scheduler::INTAKE_SUBSCRIPTION_CAPACITY),
            )
            .await?,
        );
    }
    let replies = if args.replies_url.is_none() && args.replies_creds.is_none() {
        None
    } else {
        let url = args.replies_url.as_deref().unwrap_or(&args.nats_url);
        let url = match (&args.replies_url, &args.replies_creds) {
            (None, Some(_)) => journal::url::split_credentials(url)?.0,
            _ => url.to_string(),
        };
        let name = "turnstile-scheduler-replies";
        let events = &events.replies;
        Some(connect(name, &url, args.replies_creds.as_deref(), events, None).await?)
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        signal.cancel();
    });
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
    let clock = std::sync::Arc::new(SkewedClock(args.clock_skew_ms));
    scheduler::run_with_clock(config, keyring, connections, shutdown, clock).await?;
    Ok(())
}

/// Connects as `name` to `urls` (comma-separated; `user:password@` or `token@` inside is
/// used, as the nats CLI does) with the credentials file `creds`, if any, counting its
/// events in `events` and buffering `capacity` messages per subscription (default:
/// the library's). Waits for the server (a service may start before NATS does) up
/// to 30 s; a refused identity fails at once.
async fn connect(
    name: &str,
    urls: &str,
    creds: Option<&Path>,
    events: &std::sync::Arc<service::ConnectionEvents>,
    capacity: Option<usize>,
) -> anyhow::Result<async_nats::Client> {
    let (addrs, auth) = journal::url::split_credentials(urls)?;
    if creds.is_some() && auth.is_some() {
        bail!("{addrs}: give credentials either in the URL or as a creds file, not both");
    }
    let mut attempt = 0;
    loop {
        let mut options = events.install(name, async_nats::ConnectOptions::new().name(name));
        if let Some(c) = capacity {
            options = options.subscription_capacity(c);
        }
        if let Some(path) = creds {
            options = options
                .credentials_file(path)
                .await
                .with_context(|| format!("reading NATS credentials {}", path.display()))?;
        }
        if let Some(auth) = auth.clone() {
            options = auth.apply(options);
        }
        // async-nats takes a comma-separated string as one (invalid) address.
        let servers: Vec<&str> = addrs.split(',').collect();
        match options.connect(servers).await {
            Ok(c) => return Ok(c),
            Err(e)
                if attempt < 30
                    && !matches!(
                        e.kind(),
                        async_nats::ConnectErrorKind::AuthorizationViolation
                            | async_nats::ConnectErrorKind::Authentication
                    ) =>
            {
                attempt += 1;
                tracing::warn!(url = %addrs, connection = name, error = %e, attempt, "NATS not reachable yet; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("{name}: connecting to {addrs}")),
        }
    }
}
