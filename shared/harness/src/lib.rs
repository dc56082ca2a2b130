//! Starts private `nats-server` processes for tests and benchmarks.
//!
//! Each [`NatsServer`] gets a random port (the server picks it and reports it in a
//! ports file), its own temporary store directory, and is killed and cleaned up on
//! drop. The binary is found by [`nats_server_bin`]; when none is there the error
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

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `jetstream { sync_interval: always }`: fsync every write.
    pub sync_always: bool,
}

/// A running private nats-server.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    url: String,
    options: Options,
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
        let mut s = NatsServer {
            child: None,
            dir,
            url: String::new(),
            options,
        };
        s.launch()?;
        Ok(s)
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The JetStream store directory (kept across [`NatsServer::restart`]).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
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
        self.launch()
    }

    fn launch(&mut self) -> Result<()> {
        let bin = nats_server_bin()?;
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)?;
        let sync = if self.options.sync_always {
            "  sync_interval: always\n"
        } else {
            ""
        };
        let config = format!(
            "listen: 127.0.0.1:-1\nmax_payload: 8MB\nports_file_dir: \"{ports}\"\njetstream {{\n  store_dir: \"{store}\"\n{sync}}}\n",
            ports = ports_dir.display(),
            store = self.store_dir().display(),
        );
        let config_path = self.dir.path().join("nats.conf");
        std::fs::write(&config_path, config)?;
        let log_path = self.dir.path().join("nats.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
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
    // `kill(1)` instead of libc keeps the workspace free of `unsafe`.
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(c.id().to_string())
        .status();
}
