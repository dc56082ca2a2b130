//! `alarm-loader`: the turnstile alarm-loader service. See the library for the parts.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The turnstile alarm-loader: alarms fired into the log (or to any subject) on time,
/// exactly once per due time.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    nats: service::runtime::NatsArgs,
    /// How often the window of due alarms is loaded (it reaches twice this ahead).
    #[arg(long, env = "TS_IN_MEMORY_INTERVAL_MS", default_value_t = 10_000)]
    in_memory_interval_ms: u64,
    /// Dispatches at once.
    #[arg(long, env = "TS_MAX_IN_FLIGHT", default_value_t = 1024)]
    max_in_flight: usize,
    /// The partitions' lease: a dead loader's alarms are taken over after about this
    /// long (at least 1000).
    #[arg(long, env = "TS_LEASE_MS", default_value_t = 10_000)]
    lease_ms: u64,
    /// Requests answered at once; past it a request is refused `busy` at once (bounded
    /// memory under a flood, and every request answered).
    #[arg(long, env = "TS_MAX_ANSWERING", default_value_t = alarm_loader::MAX_ANSWERING)]
    max_answering: usize,
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
    let core = args
        .nats
        .core("turnstile-alarm-loader", &events, None)
        .await?;
    let intake = args
        .nats
        .intake_if_given(
            "turnstile-alarm-intake",
            &events,
            "alarm requests are taken, and subject targets called, with the core user's rights",
        )
        .await?;
    if args.clock_skew_ms != 0 {
        tracing::warn!(
            skew_ms = args.clock_skew_ms,
            "clock skewed on purpose (--clock-skew-ms)"
        );
    }
    let shutdown = service::runtime::shutdown_on_signals();
    let settings = alarm_loader::Settings {
        prefix: args.nats.prefix,
        replicas: args.replicas,
        loader: alarm_loader::loader::Config {
            in_memory_interval: Duration::from_millis(args.in_memory_interval_ms.max(100)),
            max_in_flight: args.max_in_flight,
            lease: Duration::from_millis(args.lease_ms.max(1_000)),
            replicas: args.replicas,
            ..Default::default()
        },
        max_answering: args.max_answering,
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
