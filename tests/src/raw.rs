//! A raw NATS protocol client for hostile tests: it writes protocol bytes exactly as
//! given (headers that do not parse, non-UTF-8 subjects), which no well-behaved
//! client library would send, and reads the server's `MSG`/`HMSG` frames as bytes.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One message the server delivered.
#[derive(Debug, Clone)]
pub struct RawMsg {
    /// Its subject.
    pub subject: Vec<u8>,
    /// Its reply subject, if it has one.
    pub reply: Option<Vec<u8>>,
    /// Its header block (empty for `MSG`).
    pub header: Vec<u8>,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl RawMsg {
    /// The value of header `name` (first match, exact case), if the block has it.
    pub fn header(&self, name: &str) -> Option<String> {
        let text = String::from_utf8_lossy(&self.header);
        text.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n.trim() == name).then(|| v.trim().to_string())
        })
    }
}

/// A raw protocol connection.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// The frame of a publish: `HPUB` when `header` is given, else `PUB`.
pub fn publish(
    subject: &[u8],
    reply: Option<&[u8]>,
    header: Option<&[u8]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(if header.is_some() { b"HPUB " } else { b"PUB " });
    out.extend_from_slice(subject);
    if let Some(r) = reply {
        out.push(b' ');
        out.extend_from_slice(r);
    }
    let h = header.unwrap_or_default();
    let sizes = match header {
        Some(_) => format!(" {} {}\r\n", h.len(), h.len() + payload.len()),
        None => format!(" {}\r\n", payload.len()),
    };
    out.extend_from_slice(sizes.as_bytes());
    out.extend_from_slice(h);
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    out
}

impl RawClient {
    /// Connects to `url` (`nats://[user:password@]host:port`), with headers enabled.
    pub async fn connect(url: &str) -> Result<RawClient> {
        let (plain, credentials) = harness::split_url_credentials(url);
        let addr = plain.trim_start_matches("nats://").to_string();
        let stream = TcpStream::connect(&addr)
            .await
            .with_context(|| addr.clone())?;
        let mut c = RawClient {
            stream,
            buf: Vec::new(),
        };
        let mut connect = serde_json::json!({
            "verbose": false, "pedantic": false, "headers": true,
            "no_responders": true, "protocol": 1, "name": "raw",
        });
        if let Some((user, pass)) = credentials {
            connect["user"] = user.into();
            connect["pass"] = pass.into();
        }
        c.send(format!("CONNECT {connect}\r\n").as_bytes()).await?;
        c.flush().await?;
        Ok(c)
    }

    /// Writes `bytes` as they are.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Subscribes `sid` to `subject`.
    pub async fn subscribe(&mut self, subject: &str, sid: u32) -> Result<()> {
        self.send(format!("SUB {subject} {sid}\r\n").as_bytes())
            .await
    }

    /// Sends `PING` and returns every message delivered before the `PONG`.
    pub async fn flush(&mut self) -> Result<Vec<RawMsg>> {
        self.send(b"PING\r\n").await?;
        let mut msgs = Vec::new();
        loop {
            match self.frame(Duration::from_secs(10)).await? {
                Frame::Pong => return Ok(msgs),
                Frame::Msg(m) => msgs.push(m),
                Frame::Ping | Frame::Other => {}
            }
        }
    }

    /// Collects delivered messages until `n` have come or `wait` has passed.
    pub async fn collect(&mut self, n: usize, wait: Duration) -> Result<Vec<RawMsg>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut msgs = Vec::new();
        while msgs.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match self.frame(left).await {
                Ok(Frame::Msg(m)) => msgs.push(m),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(msgs)
    }

    async fn frame(&mut self, wait: Duration) -> Result<Frame> {
        loop {
            match self.parse()? {
                Some(Frame::Ping) => self.send(b"PONG\r\n").await?,
                Some(f) => return Ok(f),
                None => {}
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(wait, self.stream.read(&mut chunk))
                .await
                .context("no frame from the server in time")??;
            ensure!(n > 0, "the server closed the raw connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn parse(&mut self) -> Result<Option<Frame>> {
        let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = self.buf[..end].to_vec();
        let args: Vec<&[u8]> = line
            .split(|b| *b == b' ')
            .filter(|a| !a.is_empty())
            .collect();
        let num = |a: &[u8]| -> Result<usize> { Ok(std::str::from_utf8(a)?.parse()?) };
        let frame = match args.first().copied() {
            Some(b"PING") => Frame::Ping,
            Some(b"PONG") => Frame::Pong,
            Some(b"-ERR") => bail!("server error: {}", String::from_utf8_lossy(&line)),
            Some(b"MSG") | Some(b"HMSG") => {
                let with_headers = args[0] == b"HMSG";
                let sizes = if with_headers { 2 } else { 1 };
                ensure!(args.len() >= 3 + sizes, "short frame");
                let total = num(args[args.len() - 1])?;
                let hlen = if with_headers {
                    num(args[args.len() - 2])?
                } else {
                    0
                };
                if self.buf.len() < end + 2 + total + 2 {
                    return Ok(None);
                }
                let body = &self.buf[end + 2..end + 2 + total];
                let m = RawMsg {
                    subject: args[1].to_vec(),
                    reply: (args.len() == 4 + sizes).then(|| args[3].to_vec()),
                    header: body[..hlen].to_vec(),
                    payload: body[hlen..].to_vec(),
                };
                self.buf.drain(..end + 2 + total + 2);
                return Ok(Some(Frame::Msg(m)));
            }
            _ => Frame::Other,
        };
        self.buf.drain(..end + 2);
        Ok(Some(frame))
    }
}

enum Frame {
    Msg(RawMsg),
    Ping,
    Pong,
    Other,
}
