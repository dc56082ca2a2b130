//! What every service binary does before and around its own work: logging, NATS
//! identities and connections (with the conventions of the nats CLI), and the signals
//! that stop it. A service's `main` reads its flags, calls these, and hands the
//! connections and a [`CancellationToken`] to its library.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{ConnectionEvents, Error, Result};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// A token cancelled at the first SIGTERM or SIGINT: the service then drains and exits.
pub fn shutdown_on_signals() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops this service");
                let _ = tokio::signal::ctrl_c().await;
                signal.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: draining requests in hand");
        signal.cancel();
    });
    shutdown
}

/// The NATS flags every service takes (flattened into its own `clap` arguments): its
/// core identity, its intake identity in the clients' account, and the subject prefix.
/// Each service's user names are in deploy/accounts.conf.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated, of the core connection (the service's own
    /// user: `scheduler`, `alarm-loader`, `job-worker`); may carry `user:password@`.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS credentials file of the core connection.
    #[arg(long, env = "NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// NATS server URL(s) of the intake connection, in the clients' account (user
    /// `scheduler-intake`, `alarm-intake`, `worker`): client requests and their answers,
    /// the services API; may carry `user:password@`. Default: the core URL.
    #[arg(long, env = "TS_INTAKE_URL")]
    pub intake_url: Option<String>,
    /// NATS credentials file of the intake connection.
    #[arg(long, env = "TS_INTAKE_CREDS")]
    pub intake_creds: Option<PathBuf>,
    /// Subject prefix: tokens of a-z 0-9 - joined by dots (streams and buckets are
    /// named by it, upper-cased).
    #[arg(long, env = "TS_PREFIX", default_value = "ts")]
    pub prefix: String,
}

impl NatsArgs {
    /// The core connection, as `name`.
    pub async fn core(
        &self,
        name: &str,
        events: &Arc<ConnectionEvents>,
        capacity: Option<usize>,
    ) -> Result<async_nats::Client> {
        connect(
            name,
            &self.nats_url,
            self.creds.as_deref(),
            events,
            capacity,
        )
        .await
    }

    /// The intake identity as the flags give it (the core URL where only a creds file
    /// is given).
    pub fn intake(&self) -> Identity {
        Identity {
            url: self.intake_url.clone(),
            creds: self.intake_creds.clone(),
        }
    }

    /// The intake connection as `name` if the flags name an intake identity; none (with
    /// `without`, a warning saying what the core user then does) if they do not.
    pub async fn intake_if_given(
        &self,
        name: &str,
        events: &Arc<ConnectionEvents>,
        without: &str,
    ) -> Result<Option<async_nats::Client>> {
        let identity = self.intake();
        if !identity.is_given() {
            tracing::warn!("no intake identity (TS_INTAKE_URL / TS_INTAKE_CREDS): {without}");
            return Ok(None);
        }
        let (url, creds) = identity.resolve(&self.nats_url)?;
        Ok(Some(
            connect(name, &url, creds.as_deref(), events, None).await?,
        ))
    }
}

/// One NATS identity of a service as its flags give it: URL(s), which may carry
/// `user:password@` or `token@`, and a credentials file.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// Comma-separated server URLs, perhaps with credentials inside.
    pub url: Option<String>,
    /// A `.creds` file.
    pub creds: Option<PathBuf>,
}

impl Identity {
    /// Whether the flags named this identity at all.
    pub fn is_given(&self) -> bool {
        self.url.is_some() || self.creds.is_some()
    }

    /// The URL(s) and credentials file to connect with; `fallback` (the service's core
    /// URL) where no URL was given. Credentials given as a file replace any in the
    /// fallback URL, which belong to another identity.
    pub fn resolve(&self, fallback: &str) -> Result<(String, Option<PathBuf>)> {
        let url = match (&self.url, &self.creds) {
            (Some(url), _) => url.clone(),
            (None, Some(_)) => journal::url::split_credentials(fallback)?.0,
            (None, None) => fallback.to_string(),
        };
        Ok((url, self.creds.clone()))
    }
}

/// Connects as `name` to `urls` (comma-separated; `user:password@` or `token@` inside
/// is used, as the nats CLI does) with the credentials file `creds`, if any, counting
/// its events in `events` and buffering `capacity` messages per subscription (default:
/// the library's). Waits for the server (a service may start before NATS does) up to
/// 30 s; a refused identity fails at once.
pub async fn connect(
    name: &str,
    urls: &str,
    creds: Option<&Path>,
    events: &Arc<ConnectionEvents>,
    capacity: Option<usize>,
) -> Result<async_nats::Client> {
    let (addrs, auth) = journal::url::split_credentials(urls)?;
    if creds.is_some() && auth.is_some() {
        return Err(Error::Config(format!(
            "{addrs}: give credentials either in the URL or as a creds file, not both"
        )));
    }
    let mut attempt = 0;
    loop {
        let mut options = events.install(name, async_nats::ConnectOptions::new().name(name));
        if let Some(c) = capacity {
            options = options.subscription_capacity(c);
        }
        if let Some(path) = creds {
            options = options.credentials_file(path).await.map_err(|e| {
                Error::Config(format!("reading NATS credentials {}: {e}", path.display()))
            })?;
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
            Err(e) => {
                return Err(Error::Connect {
                    name: name.to_string(),
                    url: addrs,
                    reason: e.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_falls_back_to_the_core_url_without_its_credentials() {
        let core = "nats://scheduler:secret@127.0.0.1:4222";
        let none = Identity::default();
        assert!(!none.is_given());
        assert_eq!(none.resolve(core).unwrap(), (core.to_string(), None));
        let file = Identity {
            url: None,
            creds: Some("intake.creds".into()),
        };
        assert_eq!(
            file.resolve(core).unwrap(),
            (
                "nats://127.0.0.1:4222".to_string(),
                Some(PathBuf::from("intake.creds"))
            )
        );
        let url = Identity {
            url: Some("nats://intake:p@h:1".into()),
            creds: None,
        };
        assert_eq!(url.resolve(core).unwrap().0, "nats://intake:p@h:1");
    }
}
