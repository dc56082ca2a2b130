//! Starts private `nats-server` processes for tests and benchmarks.
//!
//! Each [`NatsServer`] runs the deployment's own configuration (`deploy/nats.conf` and
//! `deploy/accounts.conf`: the same users and permissions as `make run`), with random
//! passwords of its own, a random port (the server picks it and reports it in a ports
//! file) and its own temporary store directory, and is killed and cleaned up on drop.
//! [`NatsServer::url`] connects as the anonymous client; [`NatsServer::url_as`] as any
//! [`Role`]. The binary is found by [`nats_server_bin`]; when none is there the error
//! says how to install one (`make tools`).
//!
//! A [`NatsCluster`] is `n` such servers running `deploy/nats-cluster.conf` instead, routed
//! to each other and sharing their passwords: per-node URLs or all of them for failover,
//! kill / stop / restart in place / signal one node, and the leader of a stream.

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
    #[error("{0}")]
    Config(String),
    /// A cluster did not form, or a node cannot be reached as asked.
    #[error("cluster: {0}")]
    Cluster(String),
    /// A NATS request of the harness failed.
    #[error("nats: {0}")]
    Nats(String),
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
/// One node of a cluster (`NatsCluster`), copied per node as its comments say.
const CLUSTER_CONF: &str = include_str!("../../../deploy/nats-cluster.conf");
/// Its accounts, users and permissions (included by [`NATS_CONF`] and [`CLUSTER_CONF`]).
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
    /// `alarm-loader` (TURNSTILE): the alarm stream, the alarm requests, scheduling.
    AlarmLoader,
    /// `alarm-intake` (PUBLIC): the alarm requests, and requests to subject targets.
    AlarmIntake,
    /// `worker` (PUBLIC): users' responders and worker instances.
    Worker,
    /// `job-worker` (TURNSTILE): a worker instance's core connection.
    JobWorker,
}

impl Role {
    /// Every role with a password: the user name and the variable nats-server reads it from.
    const WITH_PASSWORD: [(Role, &'static str, &'static str); 8] = [
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
        (Role::AlarmLoader, "alarm-loader", "TS_ALARM_PASSWORD"),
        (
            Role::AlarmIntake,
            "alarm-intake",
            "TS_ALARM_INTAKE_PASSWORD",
        ),
        (Role::Worker, "worker", "TS_WORKER_PASSWORD"),
        (Role::JobWorker, "job-worker", "TS_JOB_WORKER_PASSWORD"),
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

/// The passwords of one deployment: a server, or every node of a cluster (the nodes
/// of a cluster share them, as deployed nodes share `accounts.conf` and its variables).
#[derive(Debug, Clone)]
struct Passwords(Vec<(Role, String)>);

impl Passwords {
    /// A fresh random password for every role that has one.
    fn random() -> Result<Passwords> {
        Role::WITH_PASSWORD
            .iter()
            .map(|(role, _, _)| Ok((*role, random_password()?)))
            .collect::<Result<Vec<_>>>()
            .map(Passwords)
    }

    fn get(&self, role: Role) -> Option<&str> {
        self.0
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, pw)| pw.as_str())
    }

    /// Each URL of the comma-separated `urls` with `role`'s credentials inside.
    fn url_as(&self, urls: &str, role: Role) -> String {
        let Some(pw) = self.get(role) else {
            return urls.to_string();
        };
        urls.split(',')
            .map(|url| url.replacen("://", &format!("://{}:{pw}@", role.user()), 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Puts the passwords where `accounts.conf` reads them: the server's environment.
    fn export(&self, cmd: &mut Command) {
        for (role, var) in Role::WITH_PASSWORD.iter().map(|(r, _, v)| (*r, *v)) {
            cmd.env(var, self.get(role).unwrap_or_default());
        }
    }
}

/// Something to connect to as a [`Role`]: a [`NatsServer`] or a whole [`NatsCluster`].
pub trait Urls {
    /// The URL(s) of `role`, its credentials inside (comma-separated for a cluster).
    fn url_as(&self, role: Role) -> String;
}

/// Which configuration a server runs.
#[derive(Debug, Clone)]
enum Layout {
    /// `deploy/nats.conf`: one server.
    Single(Options),
    /// `deploy/nats-cluster.conf`: one node of a cluster.
    Node(NodeConfig),
}

/// What makes one node of a cluster itself.
#[derive(Debug, Clone)]
struct NodeConfig {
    /// `server_name` (`n1`, `n2`, ...): what stream infos name as the leader.
    name: String,
    /// This node's route port.
    route_port: u16,
    /// Every node's route port (this one's included, as in the deployed file).
    routes: Vec<u16>,
    /// Replaces the file's `lame_duck_duration`.
    lame_duck: Option<Duration>,
}

/// How long a server started again on its store may take to listen.
const RESTART_WAIT: Duration = Duration::from_secs(180);

/// A running private nats-server.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    url: String,
    layout: Layout,
    /// The password of each role that has one (random, kept across restarts).
    passwords: Passwords,
    debug_ports: Option<DebugPorts>,
}

impl NatsServer {
    /// Starts a server with default options.
    pub fn start() -> Result<NatsServer> {
        NatsServer::start_with(Options::default())
    }

    /// Starts a server with `options`.
    pub fn start_with(options: Options) -> Result<NatsServer> {
        let mut s = NatsServer::new(Layout::Single(options), Passwords::random()?)?;
        s.launch_on("-1")?;
        Ok(s)
    }

    fn new(layout: Layout, passwords: Passwords) -> Result<NatsServer> {
        let dir = tempfile::Builder::new()
            .prefix("turnstile-nats-")
            .tempdir()?;
        let debug = matches!(&layout, Layout::Single(o) if o.debug_ports)
            || std::env::var(DEBUG_PORTS_VAR).is_ok_and(|v| v == "1");
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
        Ok(NatsServer {
            child: None,
            dir,
            url: String::new(),
            layout,
            passwords,
            debug_ports,
        })
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
        self.passwords.url_as(&self.url, role)
    }

    /// The password of `role` on this server (`None` for [`Role::Client`]).
    pub fn password(&self, role: Role) -> Option<&str> {
        self.passwords.get(role)
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
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines of [`NatsServer::log`].
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the server with SIGTERM and waits for it (SIGKILL after 10 s).
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

    /// Kills the server with SIGKILL (no shutdown of its own) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
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
        self.stop();
        self.start_in_place()
    }

    /// Starts a server that is not running (stopped, killed or exited) again on its
    /// store and its port.
    pub fn start_in_place(&mut self) -> Result<()> {
        let _ = self.exited();
        if self.child.is_some() {
            return Ok(());
        }
        let port = self.url.rsplit(':').next().unwrap_or("-1").to_string();
        self.spawn_on(&port)?;
        // A server restarted on a store of gigabytes recovers it before it listens:
        // on a loaded machine (an hour of chaos) that took longer than 20 s.
        self.wait_for_port(RESTART_WAIT)
    }

    fn launch_on(&mut self, port: &str) -> Result<()> {
        self.spawn_on(port)?;
        self.wait_for_port(Duration::from_secs(20))
    }

    /// Starts the process on the client port `port` (`-1`: any) and returns at once.
    fn spawn_on(&mut self, port: &str) -> Result<()> {
        let bin = nats_server_bin()?;
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)?;
        let config_path = self.write_config()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&config_path)
            .args(["-a", "127.0.0.1", "-p", port, "--ports_file_dir"])
            .arg(&ports_dir);
        self.passwords.export(&mut cmd);
        self.child = Some(cmd.stdout(Stdio::null()).stderr(log).spawn()?);
        Ok(())
    }

    /// Waits for the ports file of the running process and takes its client URL.
    fn wait_for_port(&mut self, timeout: Duration) -> Result<()> {
        let bin = nats_server_bin()?;
        let pid = self.pid().unwrap_or_default();
        let ports_file = self.dir.path().join("ports").join(format!(
            "{}_{pid}.ports",
            bin.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("nats-server")
        ));
        let deadline = Instant::now() + timeout;
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
                return Err(Error::StartTimeout(timeout, self.log()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Renders the layout's configuration into the server's folder, next to
    /// `deploy/accounts.conf`; returns its path.
    fn write_config(&self) -> Result<PathBuf> {
        let data = self.dir.path().display().to_string();
        let mut config = match &self.layout {
            Layout::Single(options) => single_config(&data, options)?,
            Layout::Node(node) => node_config(&data, node)?,
        };
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

impl Urls for NatsServer {
    fn url_as(&self, role: Role) -> String {
        NatsServer::url_as(self, role)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `deploy/nats.conf` with its store in `data` and the `sync_always` option.
fn single_config(data: &str, options: &Options) -> Result<String> {
    let mut config = NATS_CONF.replace("@DATA@", data);
    if options.sync_always {
        let at = config
            .find("jetstream {\n")
            .ok_or_else(|| Error::Config("deploy/nats.conf: no `jetstream {` block".into()))?
            + "jetstream {\n".len();
        config.insert_str(at, "  sync_interval: always\n");
    }
    Ok(config)
}

/// `deploy/nats-cluster.conf` as the file's own comment says to copy it per node: its
/// `server_name`, store, route port and routes changed (the client address comes from
/// the command line); everything else as deployed. Each line it changes must be there
/// exactly once, so a changed deployment file fails here instead of testing something
/// else.
fn node_config(data: &str, node: &NodeConfig) -> Result<String> {
    let routes = node
        .routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut replaced = [0usize; 4];
    let mut in_cluster = false;
    let mut out = String::new();
    for line in CLUSTER_CONF.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("cluster {") {
            in_cluster = true;
        } else if in_cluster && trimmed.starts_with('}') {
            in_cluster = false;
        }
        let new = if trimmed.starts_with("server_name:") {
            replaced[0] += 1;
            format!("server_name: {}", node.name)
        } else if trimmed.starts_with("store_dir:") {
            replaced[1] += 1;
            format!("  store_dir: \"{data}/jetstream\"")
        } else if in_cluster && trimmed.starts_with("listen:") {
            replaced[2] += 1;
            format!("  listen: 127.0.0.1:{}", node.route_port)
        } else if in_cluster && trimmed.starts_with("routes:") {
            replaced[3] += 1;
            format!("  routes: [{routes}]")
        } else if trimmed.starts_with("lame_duck_duration:") && node.lame_duck.is_some() {
            let secs = node.lame_duck.unwrap_or_default().as_secs().max(1);
            // The grace period (10 s by default) must stay below the duration.
            format!("lame_duck_duration: \"{secs}s\"\nlame_duck_grace_period: \"0s\"")
        } else {
            line.to_string()
        };
        out.push_str(&new);
        out.push('\n');
    }
    let names = [
        "server_name",
        "store_dir",
        "cluster listen",
        "cluster routes",
    ];
    for (count, name) in replaced.iter().zip(names) {
        if *count != 1 {
            return Err(Error::Config(format!(
                "deploy/nats-cluster.conf: expected one `{name}` line, found {count}"
            )));
        }
    }
    Ok(out)
}

/// How to start a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Replaces the deployed `lame_duck_duration` (30 s) so that a node sent SIGUSR2
    /// exits sooner; `None` keeps the file's.
    pub lame_duck: Option<Duration>,
    /// Return as soon as every node takes connections, before the cluster has formed
    /// (no meta leader yet): what a service started together with its cluster meets.
    /// [`NatsCluster::wait_ready`] waits for the rest.
    pub unformed: bool,
}

/// A private JetStream cluster: `n` nodes running `deploy/nats-cluster.conf` (and
/// `deploy/accounts.conf`), each with its own client port, route port and store, routed
/// to each other, sharing one set of passwords. Nodes are numbered from 0 (server names
/// `n1`, `n2`, ...). Every node is killed and cleaned up on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// How long [`NatsCluster::start`] and [`NatsCluster::restart`] wait for the
    /// cluster to be ready.
    pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

    /// Starts `n` nodes and returns once the cluster is ready (see
    /// [`NatsCluster::wait_ready`]): routed, with a JetStream meta leader.
    pub fn start(n: usize) -> Result<NatsCluster> {
        NatsCluster::start_with(n, ClusterOptions::default())
    }

    /// Starts `n` nodes with `options`. Ports are chosen before the servers bind them,
    /// so another process may take one meanwhile: a start that fails on a port in use
    /// is tried again with new ports (up to three times).
    pub fn start_with(n: usize, options: ClusterOptions) -> Result<NatsCluster> {
        let mut tries = 0;
        loop {
            tries += 1;
            match NatsCluster::launch(n, options.clone()) {
                Err(e) if tries < 3 && e.to_string().contains("address already in use") => {}
                other => return other,
            }
        }
    }

    fn launch(n: usize, options: ClusterOptions) -> Result<NatsCluster> {
        let passwords = Passwords::random()?;
        // Route ports are named in every node's config, so they are chosen first; the
        // client ports with them, all held at once so that none is another's (a client
        // port left to the server, `-p -1`, was once the node's own route port, just
        // released: "Error listening on router port ... address already in use").
        let held = (0..2 * n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()?;
        let ports = held
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(held);
        let (routes, clients) = ports.split_at(n);
        let routes = routes.to_vec();
        let mut nodes = Vec::with_capacity(n);
        for (i, port) in routes.iter().enumerate() {
            let node = NodeConfig {
                name: format!("n{}", i + 1),
                route_port: *port,
                routes: routes.clone(),
                lame_duck: options.lame_duck,
            };
            nodes.push(NatsServer::new(Layout::Node(node), passwords.clone())?);
        }
        // All at once: a node waits for its peers before JetStream is up.
        for (node, port) in nodes.iter_mut().zip(clients) {
            node.spawn_on(&port.to_string())?;
        }
        for node in &mut nodes {
            node.wait_for_port(Duration::from_secs(20))?;
        }
        let cluster = NatsCluster { nodes };
        if !options.unformed {
            cluster.wait_ready(NatsCluster::READY_TIMEOUT)?;
        }
        Ok(cluster)
    }

    /// How many nodes the cluster has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i` (its log, pid, store, ...). Panics if there is no such node.
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// The server name of node `i` (`n1` for node 0), as stream infos name a leader.
    pub fn name(&self, i: usize) -> String {
        format!("n{}", i + 1)
    }

    /// The client URL of node `i`, without credentials.
    pub fn node_url(&self, i: usize) -> &str {
        self.nodes[i].url()
    }

    /// The client URL of node `i` as `role`.
    pub fn node_url_as(&self, i: usize, role: Role) -> String {
        self.nodes[i].url_as(role)
    }

    /// Every node's client URL, comma-separated (a client fails over between them).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's client URL as `role`, comma-separated.
    pub fn url_as(&self, role: Role) -> String {
        self.passwords().url_as(&self.url(), role)
    }

    /// The password of `role` (the same on every node; `None` for [`Role::Client`]).
    pub fn password(&self, role: Role) -> Option<&str> {
        self.nodes.first().and_then(|n| n.password(role))
    }

    fn passwords(&self) -> Passwords {
        self.nodes
            .first()
            .map_or_else(|| Passwords(Vec::new()), |n| n.passwords.clone())
    }

    /// SIGKILLs node `i` (no shutdown of its own: what a crash or power loss does).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// SIGKILLs every node at once: the whole cluster's power lost.
    pub fn kill_all(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }

    /// Starts every node again in place (each stopped first if it runs) and waits until
    /// the cluster is ready again: after [`NatsCluster::kill_all`], no node can be ready
    /// alone (a meta leader needs a quorum), so they start together.
    pub fn restart_all(&mut self) -> Result<()> {
        for n in &mut self.nodes {
            n.stop();
            n.start_in_place()?;
        }
        self.wait_ready(NatsCluster::READY_TIMEOUT)
    }

    /// How node `i` ended, if it has by itself (see [`NatsServer::exited`]); it is
    /// reaped then, and [`NatsCluster::restart`] starts it again.
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.nodes[i].exited()
    }

    /// Stops node `i` with SIGTERM and waits for it to exit.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Sends signal `sig` (`USR2`: lame duck mode, `STOP`, `CONT`, ...) to node `i`.
    pub fn signal(&self, i: usize, sig: &str) -> Result<()> {
        let pid = self.nodes[i]
            .pid()
            .ok_or_else(|| Error::Cluster(format!("node {i} is not running")))?;
        send_signal(pid, sig)
    }

    /// Starts node `i` again in place (same client port, route port and store; stops
    /// it first if it runs) and waits until the cluster is ready again.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.nodes[i].stop();
        self.nodes[i].start_in_place()?;
        self.wait_ready(NatsCluster::READY_TIMEOUT)
    }

    /// Waits until every running node answers JetStream account info, which it does
    /// only once it is routed to a JetStream meta leader; on timeout the error holds
    /// each node's log tail.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let running: Vec<(usize, String)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.pid().is_some())
            .map(|(i, n)| (i, n.url_as(Role::Operator)))
            .collect();
        let pending = block_on(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut pending = running;
            while !pending.is_empty() && tokio::time::Instant::now() < deadline {
                let mut still = Vec::new();
                for (i, url) in pending {
                    if !jetstream_ready(&url).await {
                        still.push((i, url));
                    }
                }
                pending = still;
                if !pending.is_empty() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            pending.into_iter().map(|(i, _)| i).collect::<Vec<_>>()
        })?;
        if pending.is_empty() {
            return Ok(());
        }
        let logs = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- node {i} ({}):\n{}", self.name(i), n.log_tail(15)))
            .collect::<Vec<_>>()
            .join("\n");
        Err(Error::Cluster(format!(
            "nodes {pending:?} had no JetStream meta leader within {timeout:?}\n{logs}"
        )))
    }

    /// The node that leads stream `stream` now (asked of any node, as the operator,
    /// with `$JS.API.STREAM.INFO.<stream>`): `None` while it has no leader.
    pub async fn stream_leader(&self, name: &str) -> Result<Option<usize>> {
        let (urls, auth) = journal::url::split_credentials(&self.url_as(Role::Operator))
            .map_err(|e| Error::Nats(e.to_string()))?;
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .retry_on_initial_connect();
        if let Some(auth) = auth {
            options = auth.apply(options);
        }
        let addrs: Vec<&str> = urls.split(',').collect();
        let client = options
            .connect(addrs)
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        let js = async_nats::jetstream::new(client);
        let stream = js
            .get_stream(name)
            .await
            .map_err(|e| Error::Nats(format!("stream info {name}: {e}")))?;
        let leader = stream
            .cached_info()
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone());
        Ok(leader.and_then(|name| (0..self.len()).find(|i| self.name(*i) == name)))
    }
}

impl Urls for NatsCluster {
    fn url_as(&self, role: Role) -> String {
        NatsCluster::url_as(self, role)
    }
}

/// Whether the server at `url` (credentials inside) answers JetStream account info.
async fn jetstream_ready(url: &str) -> bool {
    let Ok((bare, auth)) = journal::url::split_credentials(url) else {
        return false;
    };
    let mut options = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2));
    if let Some(auth) = auth {
        options = auth.apply(options);
    }
    let Ok(client) = options.connect(bare.as_str()).await else {
        return false;
    };
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(Duration::from_secs(2));
    js.query_account().await.is_ok()
}

/// Runs `future` to completion on a runtime of its own, in a thread of its own, so
/// that blocking code (the harness's) may use async clients even when its caller runs
/// inside a tokio runtime.
fn block_on<F>(future: F) -> Result<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(future))
    })
    .join()
    .map_err(|_| Error::Cluster("the readiness check panicked".into()))?
    .map_err(Error::Io)
}

/// A TCP port free on 127.0.0.1 right now (another process may take it before the
/// server binds it; then that node fails to start and says so in its log).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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

    #[test]
    fn a_node_runs_the_deployed_cluster_config_with_its_own_name_ports_and_store() {
        let node = NodeConfig {
            name: "n2".into(),
            route_port: 7002,
            routes: vec![7001, 7002, 7003],
            lame_duck: Some(Duration::from_secs(3)),
        };
        let config = node_config("/tmp/x", &node).unwrap();
        let lines: Vec<&str> = config.lines().map(str::trim).collect();
        for expected in [
            "server_name: n2",
            "store_dir: \"/tmp/x/jetstream\"",
            "listen: 127.0.0.1:7002",
            "routes: [nats://127.0.0.1:7001, nats://127.0.0.1:7002, nats://127.0.0.1:7003]",
            "lame_duck_duration: \"3s\"",
            "sync_interval: always",
            "include \"accounts.conf\"",
        ] {
            assert!(
                lines.contains(&expected),
                "{expected:?} missing in\n{config}"
            );
        }
        // The client address is the command line's; the file's stays as deployed.
        assert!(lines.contains(&"listen: 0.0.0.0:4222"));
        assert!(!config.contains("6222"));
    }

    #[test]
    fn cluster_urls_carry_credentials_in_every_url() {
        let pw = Passwords(vec![(Role::Operator, "pw".into())]);
        assert_eq!(
            pw.url_as("nats://127.0.0.1:1,nats://127.0.0.1:2", Role::Operator),
            "nats://operator:pw@127.0.0.1:1,nats://operator:pw@127.0.0.1:2"
        );
        assert_eq!(
            pw.url_as("nats://127.0.0.1:1", Role::Client),
            "nats://127.0.0.1:1"
        );
    }
}
