//! What runs a job: the [`Handler`] trait the library's users implement, and the
//! `command` handler of the worker binary.

use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::job::Job;

/// A boxed future, as [`Handler::handle`] returns it.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Done,
    /// Try again (after this long if given, else by the group's backoff).
    Retry {
        /// The delay the handler asks for.
        after: Option<Duration>,
        /// Why.
        reason: String,
    },
    /// Failed; tried again by the group's retry policy until its attempts run out.
    Failed(String),
    /// Failed in a way that no retry can mend: dead at once.
    Fatal(String),
}

/// What an attempt runs under, beside its job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The job's execution key and the fencing token of the lease this attempt holds
    /// on it (`Ts-Execution-Key` header; none without one). A side effect that must not
    /// be made by a holder whose lease lapsed (it was stalled past it, and another job
    /// with the key has started since) carries the token to a resource that refuses
    /// a token smaller than the greatest it has seen; or the handler checks
    /// `ownership::keyed::Locks::is_current` just before it acts.
    pub fencing: Option<crate::exec_keys::Fencing>,
}

/// Runs jobs. One handler serves every job of an instance, many at once (unordered
/// groups) — so it takes `&self`. `cancel` fires when the job is cancelled, times out,
/// loses its execution key's lease, or the instance must stop at once: the handler
/// should end soon after (a `command` kills its child). A panic is caught: the attempt
/// fails, the instance lives on.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt of `job`.
    fn handle<'a>(&'a self, job: &'a Job, cancel: CancellationToken) -> BoxFuture<'a, Outcome>;

    /// Runs one attempt of `job` under `context` (its execution key's fencing token).
    /// What the instance calls; by default [`Handler::handle`], which ignores the
    /// context.
    fn handle_in<'a>(
        &'a self,
        job: &'a Job,
        context: &'a Context,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Outcome> {
        let _ = context;
        self.handle(job, cancel)
    }
}

impl<F, Fut> Handler for F
where
    F: Fn(Job, CancellationToken) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn handle<'a>(&'a self, job: &'a Job, cancel: CancellationToken) -> BoxFuture<'a, Outcome> {
        Box::pin(self(job.clone(), cancel))
    }
}

/// Bytes of a child's output kept for the record (the rest is read and dropped).
pub const MAX_CAPTURE: usize = 4096;

/// The exit status that asks for a retry (`EX_TEMPFAIL` of sysexits.h).
pub const EXIT_RETRY: i32 = 75;

/// Runs a program per job: the body on its standard input, the job in its environment
/// (`TS_PROCESS`, `TS_SLOT`, `TS_MESSAGE_ID`, `TS_GROUP`, `TS_ATTEMPT` is not known
/// here), each header as `TS_HEADER_<NAME>` (name upper-cased, `-` → `_`; the execution
/// key is `TS_HEADER_TS_EXECUTION_KEY`) and, for a job with an execution key, the
/// lease's fencing token as `TS_EXECUTION_TOKEN`. Exit 0:
/// done; 75: retry; 126 or 127 (cannot be run): dead at once; any other status or a
/// signal: failed, with the end of its standard
/// error (at most [`MAX_CAPTURE`] bytes; output beyond is read and discarded, so a
/// flood cannot fill memory). Cancelled: the child is killed.
///
/// The child dies with its instance: where util-linux's `setpriv` is installed it
/// starts the program with a parent-death signal (SIGKILL), so an instance killed with
/// SIGKILL does not leave a job running that another instance will run again.
#[derive(Debug, Clone)]
pub struct Command {
    program: String,
    args: Vec<String>,
    /// `setpriv`, if found on the PATH.
    setpriv: Option<std::path::PathBuf>,
}

impl Command {
    /// `program` with `args`.
    pub fn new(program: impl Into<String>, args: Vec<String>) -> Command {
        let setpriv = std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("setpriv"))
                .find(|p| p.is_file())
        });
        if setpriv.is_none() {
            tracing::warn!("setpriv (util-linux) not found: a job's process outlives an instance killed with SIGKILL");
        }
        Command {
            program: program.into(),
            args,
            setpriv,
        }
    }

    async fn run(&self, job: &Job, context: &Context, cancel: CancellationToken) -> Outcome {
        let mut cmd = match &self.setpriv {
            Some(setpriv) => {
                let mut c = tokio::process::Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(&self.program);
                c
            }
            None => tokio::process::Command::new(&self.program),
        };
        cmd.args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env("TS_GROUP", &job.group)
            .env("TS_PROCESS", &job.process)
            .env("TS_SLOT", job.slot.to_string())
            .env("TS_MESSAGE_ID", &job.message_id);
        if let Some(f) = &context.fencing {
            cmd.env("TS_EXECUTION_TOKEN", f.token.to_string());
        }
        for (k, v) in &job.headers {
            let name: String = k
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            if !v.contains('\0') {
                cmd.env(format!("TS_HEADER_{name}"), v);
            }
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Outcome::Fatal(format!("cannot start {}: {e}", self.program)),
        };
        let stdin = child.stdin.take();
        let body = job.body.clone();
        let feed = async move {
            if let Some(mut stdin) = stdin {
                // A child that does not read its input is not an error.
                let _ = stdin.write_all(&body).await;
                let _ = stdin.shutdown().await;
            }
        };
        let out = child.stdout.take();
        let err = child.stderr.take();
        let work = async {
            let (_, _, tail, status) = tokio::join!(feed, capture(out), capture(err), child.wait());
            (tail, status)
        };
        tokio::select! {
            (tail, status) = work => match status {
                Ok(s) if s.success() => Outcome::Done,
                // The shell's (and setpriv's) "cannot execute" / "not found".
                Ok(s) if matches!(s.code(), Some(126 | 127)) => Outcome::Fatal(format!(
                    "cannot run {}: {}",
                    self.program,
                    String::from_utf8_lossy(&tail).trim_end()
                )),
                Ok(s) if s.code() == Some(EXIT_RETRY) => Outcome::Retry {
                    after: None,
                    reason: format!("exit {EXIT_RETRY}: {}", String::from_utf8_lossy(&tail)),
                },
                Ok(s) => Outcome::Failed(format!(
                    "{}: {}",
                    describe(s),
                    String::from_utf8_lossy(&tail).trim_end()
                )),
                Err(e) => Outcome::Failed(format!("waiting for the child: {e}")),
            },
            _ = cancel.cancelled() => {
                // kill_on_drop ends it; be explicit so it is gone before we answer.
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                Outcome::Failed("cancelled: child killed".into())
            }
        }
    }
}

fn describe(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "ended".into(),
    }
}

/// Reads `pipe` to its end, keeping its last [`MAX_CAPTURE`] bytes.
async fn capture(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > MAX_CAPTURE {
                    let cut = kept.len() - MAX_CAPTURE;
                    kept.drain(..cut);
                }
            }
        }
    }
    kept
}

impl Handler for Command {
    fn handle<'a>(&'a self, job: &'a Job, cancel: CancellationToken) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { self.run(job, &Context::default(), cancel).await })
    }

    fn handle_in<'a>(
        &'a self,
        job: &'a Job,
        context: &'a Context,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(self.run(job, context, cancel))
    }
}

/// POSTs each job to a URL: the body as is, the job in headers (`Ts-Group`,
/// `Ts-Process`, `Ts-Slot`, `Ts-Message-Id`, and `Ts-Execution-Token` for a job with an
/// execution key) beside the message's own headers (those a
/// valid HTTP header can carry). 2xx: done; 429 or 503: retry, after `Retry-After`
/// seconds if it says; anything else: failed, with the status and the start of the
/// answer (at most [`MAX_CAPTURE`] bytes read). An endpoint that never answers is
/// ended by the job timeout. Plain HTTP (no TLS stack).
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl Http {
    /// A handler for `url` (`http://…`).
    pub fn new(url: &str) -> Result<Http, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("--http {url:?}: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "--http {url}: only http:// (no TLS stack here: put a local proxy in front of an https endpoint)"
            ));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Http { client, url })
    }

    async fn run(&self, job: &Job, context: &Context, cancel: CancellationToken) -> Outcome {
        let mut req = self
            .client
            .post(self.url.clone())
            .body(job.body.clone())
            .header("Ts-Group", &job.group)
            .header("Ts-Process", &job.process)
            .header("Ts-Slot", job.slot.to_string())
            .header("Ts-Message-Id", &job.message_id);
        if let Some(f) = &context.fencing {
            req = req.header("Ts-Execution-Token", f.token.to_string());
        }
        for (k, v) in &job.headers {
            if let (Ok(name), Ok(value)) = (
                reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                reqwest::header::HeaderValue::from_str(v),
            ) {
                req = req.header(name, value);
            }
        }
        let send = async {
            let mut resp = req.send().await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let mut text = Vec::new();
            while text.len() < MAX_CAPTURE {
                match resp.chunk().await {
                    Ok(Some(c)) => {
                        text.extend_from_slice(&c[..c.len().min(MAX_CAPTURE - text.len())])
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            Ok::<_, String>((status, retry_after, text))
        };
        tokio::select! {
            r = send => match r {
                Ok((status, _, _)) if status.is_success() => Outcome::Done,
                Ok((status, after, text))
                    if status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || status == reqwest::StatusCode::SERVICE_UNAVAILABLE =>
                {
                    Outcome::Retry {
                        after,
                        reason: format!("HTTP {}: {}", status.as_u16(), String::from_utf8_lossy(&text).trim_end()),
                    }
                }
                Ok((status, _, text)) => Outcome::Failed(format!(
                    "HTTP {}: {}",
                    status.as_u16(),
                    String::from_utf8_lossy(&text).trim_end()
                )),
                Err(e) => Outcome::Failed(format!("POST {}: {e}", self.url)),
            },
            _ = cancel.cancelled() => Outcome::Failed("cancelled: request abandoned".into()),
        }
    }
}

impl Handler for Http {
    fn handle<'a>(&'a self, job: &'a Job, cancel: CancellationToken) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { self.run(job, &Context::default(), cancel).await })
    }

    fn handle_in<'a>(
        &'a self,
        job: &'a Job,
        context: &'a Context,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(self.run(job, context, cancel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(body: &str) -> Job {
        Job {
            v: crate::job::JOB_VERSION,
            group: "g".into(),
            process: "p".into(),
            slot: 7,
            message_id: "m".into(),
            timestamp_ms: 0,
            headers: vec![("x-kind".into(), "blue".into())],
            body: body.as_bytes().to_vec(),
            log_seq: 1,
            chain_hash: String::new(),
        }
    }

    fn sh(script: &str) -> Command {
        Command::new("sh", vec!["-c".into(), script.into()])
    }

    #[tokio::test]
    async fn exit_zero_is_done_and_the_job_reaches_the_child() {
        let dir = tempfile_dir();
        let out = dir.join("out");
        let script = format!(
            "cat > {o}; echo \" $TS_PROCESS $TS_SLOT $TS_HEADER_X_KIND\" >> {o}",
            o = out.display()
        );
        let o = sh(&script)
            .handle(&job("body"), CancellationToken::new())
            .await;
        assert_eq!(o, Outcome::Done);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "body p 7 blue\n");
    }

    #[tokio::test]
    async fn exit_75_asks_for_a_retry_other_codes_and_signals_fail() {
        let c = CancellationToken::new;
        assert!(matches!(
            sh("exit 75").handle(&job(""), c()).await,
            Outcome::Retry { .. }
        ));
        assert_eq!(
            sh("echo boom >&2; exit 3").handle(&job(""), c()).await,
            Outcome::Failed("exit 3: boom".into())
        );
        assert!(matches!(
            sh("kill -9 $$").handle(&job(""), c()).await,
            Outcome::Failed(r) if r.starts_with("killed by signal 9")
        ));
        assert!(matches!(
            Command::new("/nonexistent/program", vec![])
                .handle(&job(""), c())
                .await,
            Outcome::Fatal(_)
        ));
    }

    #[tokio::test]
    async fn a_flood_of_output_is_bounded() {
        let o = sh("head -c 5000000 /dev/zero | tr '\\0' x >&2; exit 1")
            .handle(&job(""), CancellationToken::new())
            .await;
        match o {
            Outcome::Failed(r) => assert!(r.len() <= MAX_CAPTURE + 16, "{} bytes", r.len()),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn cancel_kills_the_child() {
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c2.cancel();
        });
        let t = std::time::Instant::now();
        let o = sh("sleep 30").handle(&job(""), cancel).await;
        assert!(matches!(o, Outcome::Failed(r) if r.starts_with("cancelled")));
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    /// A one-connection-at-a-time HTTP server answering `answers` in turn; returns its
    /// URL and what it received (head and body of each request).
    async fn http_server(
        answers: Vec<&'static str>,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jobs", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for answer in answers {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                // Read the head, then as much body as Content-Length says.
                loop {
                    let n = sock.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some(i) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if got.len() >= i + 4 + len {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                tx.send(String::from_utf8_lossy(&got).to_string()).unwrap();
                if answer == "hang" {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    continue;
                }
                sock.write_all(answer.as_bytes()).await.unwrap();
                let _ = sock.shutdown().await;
            }
        });
        (url, rx)
    }

    #[tokio::test]
    async fn http_posts_the_job_and_reads_the_status() {
        let (url, mut got) = http_server(vec![
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy",
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\nboom",
            "hang",
        ])
        .await;
        let h = Http::new(&url).unwrap();
        let c = CancellationToken::new;
        assert_eq!(
            h.handle(&job("the body"), c()).await,
            Outcome::Retry {
                after: Some(Duration::from_secs(7)),
                reason: "HTTP 503: busy".into()
            }
        );
        let req = got.recv().await.unwrap();
        assert!(req.starts_with("POST /jobs HTTP/1.1"), "{req}");
        let lower = req.to_ascii_lowercase();
        assert!(
            lower.contains("ts-process: p\r\n") && lower.contains("ts-slot: 7\r\n"),
            "{req}"
        );
        assert!(lower.contains("x-kind: blue\r\n"), "{req}");
        assert!(req.ends_with("the body"), "{req}");
        assert_eq!(h.handle(&job(""), c()).await, Outcome::Done);
        assert_eq!(
            h.handle(&job(""), c()).await,
            Outcome::Failed("HTTP 500: boom".into())
        );
        // An endpoint that never answers: the cancellation (the job timeout's) ends it.
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c2.cancel();
        });
        assert!(
            matches!(h.handle(&job(""), cancel).await, Outcome::Failed(r) if r.starts_with("cancelled"))
        );
        assert!(Http::new("https://example.com").is_err());
        assert!(Http::new("not a url").is_err());
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ts-handler-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
