//! Starts private `nats-server` processes for tests and benchmarks.
//!
//! Each [`NatsServer`] runs the deployment's own configuration (`deploy/nats.conf` and
//! `deploy/accounts.conf`: the same users and permissions as `make run`), with random
//! passwords of its own, a random port (the server picks it and reports it in a ports
//! file) and its own temporary store directory, and is killed and cleaned up on drop.
//! [`NatsServer::url`] connects as the anonymous client; [`NatsServer::url_as`] as any
//! [`Role`]. The binary is found by [`nats_server_bin`]; when none is there the error
//! says how to install one (`make tools`).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Everything that can go wrong starting servers and services.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No nats-server binary was found.
    #[error("no nats-server found: set NATS_SERVER_BIN, put nats-server >= 2.12 on PATH, or run `make tools` (installs tools/bin/nats-server)")]
    NoServerBinary,
    /// A workspace binary was not built.
    #[error("binary {0} not found; run `cargo build --workspace` first")]
    NoBinary(PathBuf),
    /// The deployment's server configuration is not what the harness expects.
    #[error("deploy/nats.conf: {0}")]
    Config(String),
    /// The server did not come up in time.
    #[error("nats-server did not start within {0:?}; its log: {1}")]
    StartTimeout(Duration, String),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("."))
}

/// The nats-server binary: `$NATS_SERVER_BIN`, then `tools/bin/nats-server` in the
/// workspace, then `nats-server` on `PATH`.
pub fn nats_server_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let local = workspace_root().join("tools/bin/nats-server");
    if local.exists() {
        return Ok(local);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nats-server"))
                .find(|p| p.exists())
        })
        .ok_or(Error::NoServerBinary)
}

/// A binary of this workspace, built in the same profile as the running executable
/// (tests run from `target/<profile>/deps/`, binaries live in `target/<profile>/`).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::NoBinary(path))
    }
}

/// The server configuration of `make run` (`@DATA@`: the data folder).
const NATS_CONF: &str = include_str!("../../../deploy/nats.conf");
/// Its accounts, users and permissions (included by [`NATS_CONF`]).
const ACCOUNTS_CONF: &str = include_str!("../../../deploy/accounts.conf");

/// Who connects: the users of `deploy/accounts.conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Anyone without credentials (`no_auth_user`): requests, reads, own consumers.
    Client,
    /// The scheduler's core connection: writes the log and the buckets.
    Scheduler,
    /// The scheduler's intake connection: takes requests, publishes only replies.
    SchedulerIntake,
    /// `scheduler-replies` (PUBLIC): the scheduler's answers.
    SchedulerReplies,
    /// Everything: process settings, keys, stream administration.
    Operator,
}

impl Role {
    /// Every role with a password: the user name and the variable nats-server reads it from.
    const WITH_PASSWORD: [(Role, &'static str, &'static str); 4] = [
        (Role::Scheduler, "scheduler", "TS_SCHEDULER_PASSWORD"),
        (
            Role::SchedulerIntake,
            "scheduler-intake",
            "TS_INTAKE_PASSWORD",
        ),
        (
            Role::SchedulerReplies,
            "scheduler-replies",
            "TS_REPLIES_PASSWORD",
        ),
        (Role::Operator, "operator", "TS_OPERATOR_PASSWORD"),
    ];

    /// The NATS user name (`client` for the anonymous role).
    pub fn user(self) -> &'static str {
        Role::WITH_PASSWORD
            .iter()
            .find(|(r, _, _)| *r == self)
            .map_or("client", |(_, user, _)| user)
    }
}

/// A fresh random password: a letter, then 32 hex digits (the server parses a
/// substituted value, so it must not look like a number).
fn random_password() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(std::iter::once("p".to_string())
        .chain(bytes.iter().map(|b| format!("{b:02x}")))
        .collect())
}

/// Takes `user:password@` out of a NATS URL (async-nats 0.51 ignores credentials in a
/// URL): the URL without them, and the user and password (see `journal::url`).
pub fn split_url_credentials(url: &str) -> (String, Option<(String, String)>) {
    match journal::url::split_credentials(url) {
        Ok((bare, Some(journal::url::UrlAuth::UserPassword(user, password)))) => {
            (bare, Some((user, password)))
        }
        Ok((bare, Some(journal::url::UrlAuth::Token(token)))) => {
            (bare, Some((token, String::new())))
        }
        Ok((bare, None)) => (bare, None),
        Err(_) => (url.to_string(), None),
    }
}

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `jetstream { sync_interval: always }`: fsync every write.
    pub sync_always: bool,
    /// Open the monitoring (`http`) and profiling (`prof_port`) ports, on 127.0.0.1,
    /// kept across restarts; printed to stderr and given by [`NatsServer::debug_ports`].
    /// Also on when the environment has `TS_NATS_DEBUG_PORTS=1`. Off by default.
    pub debug_ports: bool,
}

/// The variable that opens a server's monitoring and profiling ports (see
/// [`Options::debug_ports`]).
pub const DEBUG_PORTS_VAR: &str = "TS_NATS_DEBUG_PORTS";

/// The monitoring and profiling ports of a server started with
/// [`Options::debug_ports`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugPorts {
    /// `/varz`, `/jsz`, `/connz`, ...
    pub http: u16,
    /// `/debug/pprof/...`.
    pub prof: u16,
}

/// A port free now on 127.0.0.1 (the server binds it a moment later).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running private nats-server.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    url: String,
    options: Options,
    /// The password of each role that has one (random, kept across restarts).
    passwords: Vec<(Role, String)>,
    debug_ports: Option<DebugPorts>,
}

impl NatsServer {
    /// Starts a server with default options.
    pub fn start() -> Result<NatsServer> {
        NatsServer::start_with(Options::default())
    }

    /// Starts a server with `options`.
    pub fn start_with(options: Options) -> Result<NatsServer> {
        let dir = tempfile::Builder::new()
            .prefix("turnstile-nats-")
            .tempdir()?;
        let passwords = Role::WITH_PASSWORD
            .iter()
            .map(|(role, _, _)| Ok((*role, random_password()?)))
            .collect::<Result<Vec<_>>>()?;
        let debug = options.debug_ports || std::env::var(DEBUG_PORTS_VAR).is_ok_and(|v| v == "1");
        let debug_ports = if debug {
            let ports = DebugPorts {
                http: free_port()?,
                prof: free_port()?,
            };
            eprintln!(
                "nats-server debug ports: monitoring http://127.0.0.1:{}/ profiling http://127.0.0.1:{}/debug/pprof/ (store {})",
                ports.http,
                ports.prof,
                dir.path().display()
            );
            Some(ports)
        } else {
            None
        };
        let mut s = NatsServer {
            child: None,
            dir,
            url: String::new(),
            options,
            passwords,
            debug_ports,
        };
        s.launch()?;
        Ok(s)
    }

    /// The monitoring and profiling ports, when the server was started with them.
    pub fn debug_ports(&self) -> Option<DebugPorts> {
        self.debug_ports
    }

    /// The URL of a client without credentials, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of `role`, its credentials inside: `nats://<user>:<password>@127.0.0.1:<port>`
    /// (the anonymous [`Role::Client`]: [`NatsServer::url`]).
    pub fn url_as(&self, role: Role) -> String {
        match self.password(role) {
            Some(pw) => self
                .url
                .replacen("://", &format!("://{}:{pw}@", role.user()), 1),
            None => self.url.clone(),
        }
    }

    /// The password of `role` on this server (`None` for [`Role::Client`]).
    pub fn password(&self, role: Role) -> Option<&str> {
        self.passwords
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, pw)| pw.as_str())
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How the server ended, if it has (e.g. killed by the kernel); it is reaped then,
    /// and [`NatsServer::restart_in_place`] starts it again.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// The server's log file (kept across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// The JetStream store directory (kept across [`NatsServer::restart`]).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// What the server logged so far (empty if it cannot be read).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Stops the server with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts the server on the same store (the port may change: read
    /// [`NatsServer::url`] again).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch_on("-1")
    }

    /// Stops and starts the server on the same store and the same port, so that
    /// connected clients reconnect to it by themselves.
    pub fn restart_in_place(&mut self) -> Result<()> {
        let port = self.url.rsplit(':').next().unwrap_or("-1").to_string();
        self.stop();
        self.launch_on(&port)
    }

    fn launch(&mut self) -> Result<()> {
        self.launch_on("-1")
    }

    fn launch_on(&mut self, port: &str) -> Result<()> {
        let bin = nats_server_bin()?;
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)?;
        let config_path = self.write_config()?;
        let log_path = self.dir.path().join("nats.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&config_path)
            .args(["-a", "127.0.0.1", "-p", port, "--ports_file_dir"])
            .arg(&ports_dir);
        for (role, var) in Role::WITH_PASSWORD.iter().map(|(r, _, v)| (*r, *v)) {
            cmd.env(var, self.password(role).unwrap_or_default());
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn()?;
        let pid = child.id();
        self.child = Some(child);
        let timeout = Duration::from_secs(20);
        let deadline = Instant::now() + timeout;
        let ports_file = ports_dir.join(format!(
            "{}_{pid}.ports",
            bin.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("nats-server")
        ));
        loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file) {
                if let Some(url) = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["nats"][0].as_str().map(str::to_string))
                {
                    self.url = url;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(Error::StartTimeout(timeout, log));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Renders `deploy/nats.conf` into the server's folder (store there, the
    /// `sync_always` and `debug_ports` options) next to `deploy/accounts.conf`; returns its path.
    fn write_config(&self) -> Result<PathBuf> {
        let mut config = NATS_CONF.replace("@DATA@", &self.dir.path().display().to_string());
        if self.options.sync_always {
            let at = config
                .find("jetstream {\n")
                .ok_or_else(|| Error::Config("no `jetstream {` block".into()))?
                + "jetstream {\n".len();
            config.insert_str(at, "  sync_interval: always\n");
        }
        if let Some(p) = self.debug_ports {
            config.push_str(&format!(
                "\n# {DEBUG_PORTS_VAR}\nhttp: \"127.0.0.1:{}\"\nprof_port: {}\n",
                p.http, p.prof
            ));
        }
        std::fs::write(self.dir.path().join("accounts.conf"), ACCOUNTS_CONF)?;
        let path = self.dir.path().join("nats.conf");
        std::fs::write(&path, config)?;
        Ok(path)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A child process (a service under test) killed on drop.
#[derive(Debug)]
pub struct Process {
    child: Option<Child>,
}

impl Process {
    /// Spawns `cmd`, with its output going to the test's stderr.
    pub fn spawn(mut cmd: Command) -> Result<Process> {
        Ok(Process {
            child: Some(cmd.stdout(Stdio::null()).spawn()?),
        })
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How the process ended, if it has (reaped: it is then no longer running here).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout`; returns whether it exited by itself.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        signal(&c, "TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(c: &Child, sig: &str) {
    let _ = send_signal(c.id(), sig);
}

/// Sends signal `sig` (`STOP`, `CONT`, `KILL`, `TERM`, ...) to process `pid`, e.g. a
/// [`NatsServer::pid`] to stall it; errs when `kill` fails (no such process).
pub fn send_signal(pid: u32, sig: &str) -> Result<()> {
    // `kill(1)` instead of libc keeps the workspace free of `unsafe`.
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Io(std::io::Error::other(format!(
            "kill -{sig} {pid}: {status}"
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_out_of_a_url() {
        assert_eq!(
            split_url_credentials("nats://op:p%40w@127.0.0.1:4222"),
            (
                "nats://127.0.0.1:4222".to_string(),
                Some(("op".to_string(), "p@w".to_string()))
            )
        );
        assert_eq!(
            split_url_credentials("nats://127.0.0.1:4222"),
            ("nats://127.0.0.1:4222".to_string(), None)
        );
        assert_eq!(Role::SchedulerIntake.user(), "scheduler-intake");
        assert_eq!(Role::Client.user(), "client");
    }
}
