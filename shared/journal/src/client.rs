//! The scheduler's request/reply client. Any NATS client can do what this does
//! (see `schemas/`); this is the typed Rust convenience the CLI and tests use.

use std::time::Duration;

use async_nats::{HeaderMap, Message};
use bytes::Bytes;

use protocol::wire::{ErrorCode, Mode, RangePage, RangeRequest, Receipt, SlotInfo};
use protocol::ProcessId;

use crate::subjects::{self, Subjects};
use crate::{Error, Result};

/// Options of one scheduling request.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    /// `Nats-Msg-Id`: scheduling the same id again returns the original assignment.
    pub message_id: Option<String>,
    /// `Ts-Mode`; none: the process's or the service's default.
    pub mode: Option<Mode>,
    /// Headers stored with the message.
    pub headers: Vec<(String, String)>,
}

/// A typed client of the scheduler service.
#[derive(Debug, Clone)]
pub struct Client {
    nats: async_nats::Client,
    subjects: Subjects,
    timeout: Duration,
}

impl Client {
    /// A client using `subjects` with a 10 s request timeout.
    pub fn new(nats: async_nats::Client, subjects: Subjects) -> Client {
        Client {
            nats,
            subjects,
            timeout: Duration::from_secs(10),
        }
    }

    /// Changes the request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// Schedules `body` for `process`.
    pub async fn schedule(
        &self,
        process: &ProcessId,
        body: Bytes,
        opts: &Schedule,
    ) -> Result<Receipt> {
        let mut h = HeaderMap::new();
        if let Some(id) = &opts.message_id {
            h.insert(subjects::MSG_ID, id.as_str());
        }
        if let Some(m) = opts.mode {
            h.insert(subjects::MODE, m.as_str());
        }
        for (k, v) in &opts.headers {
            h.append(k.as_str(), v.as_str());
        }
        let reply = self
            .request(self.subjects.schedule(process), h, body)
            .await?;
        Ok(Receipt::decode(&reply.payload)?)
    }

    /// The current slot of `process`, read from the log.
    pub async fn slot(&self, process: &ProcessId) -> Result<SlotInfo> {
        let reply = self
            .request(self.subjects.slot(process), HeaderMap::new(), Bytes::new())
            .await?;
        Ok(SlotInfo::decode(&reply.payload)?)
    }

    /// One page of `process`'s assignments.
    pub async fn range(&self, process: &ProcessId, req: &RangeRequest) -> Result<RangePage> {
        let reply = self
            .request(
                self.subjects.range(process),
                HeaderMap::new(),
                req.encode()?.into(),
            )
            .await?;
        Ok(RangePage::decode(&reply.payload)?)
    }

    /// Sends a raw request and turns a typed error reply into [`Error::Refused`].
    pub async fn request(
        &self,
        subject: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Message> {
        let req = async_nats::Request::new()
            .payload(body)
            .headers(headers)
            .timeout(Some(self.timeout));
        let msg = self
            .nats
            .send_request(subject.clone(), req)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => Error::NoResponders(subject.clone()),
                async_nats::RequestErrorKind::TimedOut => Error::Timeout(subject.clone()),
                _ => Error::JetStream {
                    op: "request",
                    reason: e.to_string(),
                },
            })?;
        if let Some(refusal) = refusal(&msg) {
            return Err(refusal);
        }
        Ok(msg)
    }
}

/// The typed error carried by a reply's headers, if it is one.
pub fn refusal(msg: &Message) -> Option<Error> {
    let h = msg.headers.as_ref()?;
    let code = h.get(subjects::ERROR)?;
    let code = ErrorCode::parse(code.as_str()).unwrap_or(ErrorCode::Internal);
    let message = h
        .get(subjects::SERVICE_ERROR)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    Some(Error::Refused { code, message })
}

/// Which scheduler replicas (services-API ids) have applied process settings up to
/// `revision` of the settings bucket, and which have not, polling `$SRV.STATS` until
/// all have or `wait` has passed.
pub async fn settings_applied(
    nats: &async_nats::Client,
    revision: u64,
    wait: Duration,
) -> Result<(Vec<String>, Vec<String>)> {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let inbox = nats.new_inbox();
        let mut sub = nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| Error::JetStream {
                op: "ask the schedulers",
                reason: e.to_string(),
            })?;
        nats.publish_with_reply("$SRV.STATS.turnstile-scheduler", inbox, Bytes::new())
            .await
            .map_err(|e| Error::JetStream {
                op: "ask the schedulers",
                reason: e.to_string(),
            })?;
        let (mut applied, mut behind) = (Vec::new(), Vec::new());
        let window = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(m)) = tokio::time::timeout_at(window, sub.next()).await {
            let Ok(stats) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
                continue;
            };
            let id = stats["id"].as_str().unwrap_or("?").to_string();
            let seen = stats["endpoints"]
                .as_array()
                .and_then(|eps| eps.iter().find(|e| e["name"] == "schedule"))
                .and_then(|e| e["data"]["settings_revision"].as_u64())
                .unwrap_or(0);
            if seen >= revision {
                applied.push(id);
            } else {
                behind.push(id);
            }
        }
        if behind.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok((applied, behind));
        }
    }
}
