//! `scheduler`: the turnstile scheduler service. See the library for the parts.

use std::time::Duration;

use anyhow::Context;
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
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
        remote_stream: args.remote_stream,
        remote_domain: args.remote_domain,
        replicas: args.replicas,
        singles_in_flight: args.singles_in_flight,
        ..Config::default()
    };
    let keyring = Keyring::from_files(&args.keys)?;
    // Wait for the server (a service may start before NATS does), then check it.
    let mut attempt = 0;
    let client = loop {
        match async_nats::ConnectOptions::new()
            .name("turnstile-scheduler")
            .connect(args.nats_url.as_str())
            .await
        {
            Ok(c) => break c,
            Err(e) if attempt < 30 => {
                attempt += 1;
                tracing::warn!(url = %args.nats_url, error = %e, attempt, "NATS not reachable yet; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", args.nats_url)),
        }
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
        intake: client.clone(),
        core: client,
    };
    scheduler::run(config, keyring, connections, shutdown).await?;
    Ok(())
}
