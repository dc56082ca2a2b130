//! `alarm-loader`: the turnstile alarm-loader service. See the library for the parts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use service::runtime::{connect, Identity};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The turnstile alarm-loader: alarms fired into the log (or to any subject) on time,
/// exactly once per due time.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// NATS server URL(s) of the loader's own connection (user `alarm-loader` in
    /// deploy/accounts.conf); may carry `user:password@`.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file of that connection.
    #[arg(long, env = "NATS_CREDS")]
    creds: Option<PathBuf>,
    /// NATS server URL(s) of the intake connection, in the clients' account (user
    /// `alarm-intake`): takes the alarm requests, answers them, sends alarms to subject
    /// targets. Default: the core connection.
    #[arg(long, env = "TS_INTAKE_URL")]
    intake_url: Option<String>,
    /// NATS credentials file of the intake connection.
    #[arg(long, env = "TS_INTAKE_CREDS")]
    intake_creds: Option<PathBuf>,
    /// Subject prefix.
    #[arg(long, env = "TS_PREFIX", default_value = "ts")]
    prefix: String,
    /// How often the window of due alarms is loaded (it reaches twice this ahead).
    #[arg(long, env = "TS_IN_MEMORY_INTERVAL_MS", default_value_t = 10_000)]
    in_memory_interval_ms: u64,
    /// Dispatches at once.
    #[arg(long, env = "TS_MAX_IN_FLIGHT", default_value_t = 256)]
    max_in_flight: usize,
    /// The partitions' lease: a dead loader's alarms are taken over after about this
    /// long (at least 1000).
    #[arg(long, env = "TS_LEASE_MS", default_value_t = 10_000)]
    lease_ms: u64,
    /// Replicas of the alarm stream (and the ownership bucket) when this loader creates it.
    #[arg(long, env = "TS_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// Testing aid (fault injection, `make chaos ALARMS=1`): run with the system clock
    /// shifted by this many milliseconds (negative: behind).
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
    // One line for an operator (or a supervisor's log) to act on.
    match start().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("alarm-loader: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn start() -> anyhow::Result<()> {
    service::runtime::init_tracing();
    let args = Args::parse();
    let events = Arc::new(service::ConnectionEvents::default());
    let core = connect(
        "turnstile-alarm-loader",
        &args.nats_url,
        args.creds.as_deref(),
        &events,
        None,
    )
    .await?;
    let intake_identity = Identity {
        url: args.intake_url,
        creds: args.intake_creds,
    };
    let intake = if intake_identity.is_given() {
        let (url, creds) = intake_identity.resolve(&args.nats_url)?;
        let name = "turnstile-alarm-intake";
        Some(connect(name, &url, creds.as_deref(), &events, None).await?)
    } else {
        tracing::warn!("no intake identity (TS_INTAKE_URL / TS_INTAKE_CREDS): alarm requests are taken, and subject targets called, with the core user's rights");
        None
    };
    if args.clock_skew_ms != 0 {
        tracing::warn!(
            skew_ms = args.clock_skew_ms,
            "clock skewed on purpose (--clock-skew-ms)"
        );
    }
    let shutdown = service::runtime::shutdown_on_signals();
    let settings = alarm_loader::Settings {
        prefix: args.prefix,
        replicas: args.replicas,
        loader: alarm_loader::loader::Config {
            in_memory_interval: Duration::from_millis(args.in_memory_interval_ms.max(100)),
            max_in_flight: args.max_in_flight,
            lease: Duration::from_millis(args.lease_ms.max(1_000)),
            replicas: args.replicas,
            ..Default::default()
        },
    };
    let connections = alarm_loader::Connections {
        core,
        intake,
        events,
    };
    alarm_loader::run(
        settings,
        connections,
        shutdown,
        alarm_loader::loader::skewed_clock(args.clock_skew_ms),
    )
    .await?;
    Ok(())
}
