//! The skeleton every turnstile service fills in: the NATS services API (ADR-32:
//! `$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`, as `nats micro ls` reads it), endpoints in
//! a queue group, typed refusals, and two defences every listener needs:
//!
//! - **No answer into our own space.** A responder publishes its answer to the reply
//!   subject the requester chose, with the responder's rights. A request whose reply
//!   subject lies in the deployment's space or the server's (`<prefix>.>`, `$JS`,
//!   `$KV`, `$SRV`, `$SYS`, every `$…`) is never answered — not by an endpoint and not
//!   by the services API itself — only counted ([`Counters::replies_refused`]).
//! - **Malformed requests are answered, not fatal.** The patched client library
//!   delivers a message it cannot parse marked malformed (ARCHITECTURE.md, "Patched
//!   dependency"); the endpoint hands it over as such, the service answers a typed
//!   `malformed` refusal where the reply subject is usable, and counts it.
//!
//! # Layout
//! - [`Service`]: registration and the `$SRV` responder.
//! - [`Endpoint`]: one endpoint's requests.
//! - [`Request`]: one request and its single answer.
//! - [`ConnectionEvents`]: what a connection's client library reports only through
//!   its event callback (slow-consumer drops, server errors), counted for STATS.
//! - [`runtime`]: what every service binary does around its work: logging, NATS
//!   identities and connections, the signals that stop it.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_nats::{HeaderMap, Message, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use journal::subjects::{self, Subjects};
use protocol::wire::ErrorCode;

pub mod runtime;

/// Milliseconds since the Unix epoch (UTC). Services take one: the real clock lives at
/// the edge ([`system_clock`]), tests and fault runs pass their own.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    })
}

/// The system clock shifted by `skew_ms` (saturating at the epoch): the hidden
/// `--clock-skew-ms` of the services, a fault-injection knob (`make chaos`).
pub fn skewed_clock(skew_ms: i64) -> Clock {
    let system = system_clock();
    Arc::new(move || system().saturating_add_signed(skew_ms))
}

/// Everything that can go wrong running a service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Subscribing failed.
    #[error("subscribing to {subject}: {reason}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        reason: String,
    },
    /// Publishing an answer failed.
    #[error("answering on {subject}: {reason}")]
    Publish {
        /// The reply subject.
        subject: String,
        /// Why.
        reason: String,
    },
    /// A connection could not be made (refused identity, or no server in time).
    #[error("{name}: connecting to {url}: {reason}")]
    Connect {
        /// The connection's name.
        name: String,
        /// The server URL(s), credentials taken out.
        url: String,
        /// Why.
        reason: String,
    },
    /// The flags or environment do not make a usable configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// From the journal crate (URLs, setup).
    #[error(transparent)]
    Journal(#[from] journal::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a service says about itself.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Service name (`turnstile-scheduler`).
    pub name: String,
    /// Version (semver).
    pub version: String,
    /// One line for people.
    pub description: String,
    /// Queue group of the endpoints: replicas share the requests.
    pub queue_group: String,
    /// Metadata published in PING/INFO/STATS (limits, settings).
    pub metadata: HashMap<String, String>,
}

/// Counters every service keeps, beside its own.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests whose reply subject lies in our own space: dropped unanswered.
    pub replies_refused: AtomicU64,
    /// Requests the client library could not parse.
    pub malformed_requests: AtomicU64,
}

#[derive(Debug)]
struct EndpointStats {
    name: String,
    subject: String,
    requests: AtomicU64,
    errors: AtomicU64,
    processing_ns: AtomicU64,
    last_error: Mutex<String>,
}

/// What a connection's client library reports only through its event callback,
/// counted and logged, never ignored. Install it with [`ConnectionEvents::install`] on
/// the connection's options, and show it in STATS with [`Service::watch`].
///
/// A slow consumer here is the client library's own: a subscription's buffer
/// (`subscription_capacity`) was full and a message was dropped. Each drop raises an
/// event, logged here; the library's event queue (128) overflows in a burst, so the
/// exact count is the patched library's `Statistics::dropped_messages` (ARCHITECTURE.md,
/// "Patched dependency"), which STATS shows. When the *server* cuts a connection for
/// being slow, it shows as a disconnect and a server error.
#[derive(Debug, Default)]
pub struct ConnectionEvents {
    slow_consumer_events: AtomicU64,
    disconnects: AtomicU64,
    server_errors: AtomicU64,
    last_server_error: Mutex<String>,
    /// Server errors that are permission violations (a startup step retrying a
    /// request that only times out ends on one: `journal::retry::Denials`).
    permission_denials: AtomicU64,
}

impl ConnectionEvents {
    /// Counts the events of the connection `name` made with `options`.
    pub fn install(
        self: &Arc<Self>,
        name: &str,
        options: async_nats::ConnectOptions,
    ) -> async_nats::ConnectOptions {
        let me = Arc::clone(self);
        let name: Arc<str> = name.into();
        options.event_callback(move |event| {
            let me = Arc::clone(&me);
            let name = Arc::clone(&name);
            async move { me.record(&name, event) }
        })
    }

    /// Counts (and logs) one event of the connection `name`.
    pub fn record(&self, name: &str, event: async_nats::Event) {
        use async_nats::Event;
        match event {
            Event::SlowConsumer(sid) => {
                let n = self.slow_consumer_events.fetch_add(1, Ordering::Relaxed) + 1;
                // The log says so at the 1st, 2nd, 4th, 8th, ... event.
                if n.is_power_of_two() {
                    warn!(connection = name, sid, events = n, "slow consumer: a subscription's buffer was full and the client library dropped a message (count: slow_consumer_drops in $SRV.STATS)");
                }
            }
            Event::Disconnected => {
                self.disconnects.fetch_add(1, Ordering::Relaxed);
                warn!(connection = name, "disconnected from NATS");
            }
            Event::ServerError(e) => {
                self.server_errors.fetch_add(1, Ordering::Relaxed);
                // The server's -ERR carries no code: its text is all there is.
                if let async_nats::ServerError::Other(text) = &e {
                    if text.to_ascii_lowercase().contains("permissions violation") {
                        self.permission_denials.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Ok(mut last) = self.last_server_error.lock() {
                    *last = e.to_string();
                }
                warn!(connection = name, error = %e, "NATS server error");
            }
            Event::ClientError(e) => warn!(connection = name, error = %e, "NATS client error"),
            Event::LameDuckMode => warn!(connection = name, "NATS server in lame duck mode"),
            Event::Connected => tracing::info!(connection = name, "connected to NATS"),
            Event::Draining | Event::Closed => {}
        }
    }

    fn snapshot(&self, client: &async_nats::Client) -> Value {
        let s = client.statistics();
        json!({
            "connects": s.connects.load(Ordering::Relaxed),
            "disconnects": self.disconnects.load(Ordering::Relaxed),
            "slow_consumer_drops": s.dropped_messages.load(Ordering::Relaxed),
            "slow_consumer_events": self.slow_consumer_events.load(Ordering::Relaxed),
            "server_errors": self.server_errors.load(Ordering::Relaxed),
            "last_server_error": self.last_server_error.lock().map(|l| l.clone()).unwrap_or_default(),
            "in_msgs": s.in_messages.load(Ordering::Relaxed),
            "out_msgs": s.out_messages.load(Ordering::Relaxed),
        })
    }
}

impl journal::retry::Denials for ConnectionEvents {
    fn permission_denials(&self) -> (u64, String) {
        let last = self
            .last_server_error
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        (self.permission_denials.load(Ordering::Relaxed), last)
    }
}

type DataFn = dyn Fn(&str) -> Value + Send + Sync;

/// A connection shown in STATS.
struct Watched {
    name: String,
    client: async_nats::Client,
    events: Arc<ConnectionEvents>,
}

struct Inner {
    /// Takes the services API's requests (the first of `requests`).
    client: async_nats::Client,
    /// Take the endpoints' requests.
    requests: Vec<async_nats::Client>,
    /// Publishes every answer, if set; otherwise the connection a request came in on.
    replies: Option<async_nats::Client>,
    watched: Mutex<Vec<Watched>>,
    spec: Spec,
    id: String,
    started: String,
    subjects: Subjects,
    endpoints: Mutex<Vec<Arc<EndpointStats>>>,
    counters: Arc<Counters>,
    data: Box<DataFn>,
    stop: CancellationToken,
}

/// A registered service: answers the services API until [`Service::stop`].
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.inner.spec.name)
            .field("id", &self.inner.id)
            .finish()
    }
}

impl Service {
    /// Registers `spec` on `client`, which takes the requests and answers them;
    /// `data(endpoint)` gives the `data` of an endpoint's STATS. Add the endpoints,
    /// then [`Service::announce`]: a service answers PING only once it serves its
    /// endpoints.
    pub async fn start(
        client: async_nats::Client,
        spec: Spec,
        subjects: Subjects,
        data: impl Fn(&str) -> Value + Send + Sync + 'static,
    ) -> Result<Service> {
        Service::start_split(vec![client], None, spec, subjects, data).await
    }

    /// As [`Service::start`], with requests taken on `requests` and every answer sent
    /// on `replies` if given: a backlog of answers then never holds up the reading of
    /// requests (nor, on the server, counts against the same connection's pending
    /// limit). Without it each request is answered on the connection it came in on
    /// (as `allow_responses` demands).
    /// Each endpoint subscribes on every connection of `requests` (one queue group):
    /// the server spreads the requests over them, so they are read in parallel and a
    /// burst meets the server's per-connection limit (`max_pending`, 64 MB) once per
    /// connection. The services API listens on the first. Errs if `requests` is empty.
    pub async fn start_split(
        requests: Vec<async_nats::Client>,
        replies: Option<async_nats::Client>,
        spec: Spec,
        subjects: Subjects,
        data: impl Fn(&str) -> Value + Send + Sync + 'static,
    ) -> Result<Service> {
        let started = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let Some(client) = requests.first().cloned() else {
            return Err(Error::Subscribe {
                subject: spec.name,
                reason: "no connection to take requests on".into(),
            });
        };
        let inner = Arc::new(Inner {
            id: uuid::Uuid::new_v4().simple().to_string(),
            client,
            requests,
            replies,
            watched: Mutex::new(Vec::new()),
            spec,
            started,
            subjects,
            endpoints: Mutex::new(Vec::new()),
            counters: Arc::new(Counters::default()),
            data: Box::new(data),
            stop: CancellationToken::new(),
        });
        Ok(Service { inner })
    }

    /// Starts answering `$SRV.PING/INFO/STATS` (call it once the endpoints are added).
    pub async fn announce(&self) -> Result<()> {
        let inner = &self.inner;
        let mut subs = Vec::new();
        for verb in ["PING", "INFO", "STATS"] {
            for subject in [
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.{}", inner.spec.name),
                format!("$SRV.{verb}.{}.{}", inner.spec.name, inner.id),
            ] {
                let sub = subscribe(&inner.client, &subject, None).await?;
                subs.push((verb, sub));
            }
        }
        let streams = futures::stream::select_all(
            subs.into_iter()
                .map(|(verb, sub)| sub.map(move |m| (verb, m)).boxed()),
        );
        tokio::spawn(answer_srv(Arc::clone(inner), streams));
        // The subscriptions must be in place on the server before anyone is told.
        inner.client.flush().await.map_err(|e| Error::Subscribe {
            subject: "$SRV.>".into(),
            reason: e.to_string(),
        })?;
        Ok(())
    }

    /// Adds endpoint `name` on `subject` (in the service's queue group).
    pub async fn endpoint(&self, name: &str, subject: String) -> Result<Endpoint> {
        let mut subs = Vec::new();
        for client in &self.inner.requests {
            let queue = Some(self.inner.spec.queue_group.clone());
            let answer_on = self.inner.replies.clone().unwrap_or_else(|| client.clone());
            subs.push((answer_on, subscribe(client, &subject, queue).await?));
        }
        let stats = Arc::new(EndpointStats {
            name: name.to_string(),
            subject,
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            processing_ns: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
        });
        if let Ok(mut e) = self.inner.endpoints.lock() {
            e.push(Arc::clone(&stats));
        }
        Ok(Endpoint {
            subs,
            turn: 0,
            stats,
            inner: Arc::clone(&self.inner),
            draining: false,
        })
    }

    /// Shows connection `name` (its events and the library's statistics) in STATS,
    /// under `connections`, and adds its drops to the top-level `slow_consumer_drops`.
    pub fn watch(&self, name: &str, client: async_nats::Client, events: Arc<ConnectionEvents>) {
        if let Ok(mut w) = self.inner.watched.lock() {
            w.push(Watched {
                name: name.to_string(),
                client,
                events,
            });
        }
    }

    /// The service's counters.
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.inner.counters)
    }

    /// This instance's id (as PING reports it).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Stops answering the services API (endpoints stop when dropped or stopped).
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }
}

async fn subscribe(
    client: &async_nats::Client,
    subject: &str,
    queue: Option<String>,
) -> Result<Subscriber> {
    let r = match queue {
        Some(q) => client.queue_subscribe(subject.to_string(), q).await,
        None => client.subscribe(subject.to_string()).await,
    };
    r.map_err(|e| Error::Subscribe {
        subject: subject.to_string(),
        reason: e.to_string(),
    })
}

/// Longest `Nats-Service-Error` message (bytes); a longer one is cut, marked `…`.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// `text` cut to at most `max` bytes on a character boundary, `…` marking a cut.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Asks every live instance of the service `name` (`verb`: `PING`, `INFO` or `STATS`
/// of the services API) and gathers the answers that arrive `within`: one JSON object
/// per instance that answered, status messages and bodies that are not JSON skipped.
/// The one discovery every service and the CLI use.
pub async fn ask_all(
    client: &async_nats::Client,
    verb: &str,
    name: &str,
    within: std::time::Duration,
) -> Result<Vec<Value>> {
    let subject = format!("$SRV.{verb}.{name}");
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| Error::Subscribe {
            subject: inbox.clone(),
            reason: e.to_string(),
        })?;
    client
        .publish_with_reply(subject.clone(), inbox, Bytes::new())
        .await
        .map_err(|e| Error::Publish {
            subject,
            reason: e.to_string(),
        })?;
    let deadline = tokio::time::Instant::now() + within;
    let mut answers = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
        if m.status.is_some() {
            continue;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
            if v.is_object() {
                answers.push(v);
            }
        }
    }
    Ok(answers)
}

/// Why the client library could not parse `msg`, if it could not.
pub fn malformed(msg: &Message) -> Option<String> {
    msg.malformed_reason().map(str::to_string)
}

/// The reply subject of `msg` if a service may answer there: none when it has none,
/// when it is reserved (counted), or when the message is malformed and its reply
/// could not be read.
fn usable_reply<'a>(inner: &Inner, msg: &'a Message) -> Option<&'a str> {
    let reply = msg.reply.as_ref()?.as_str();
    if inner.subjects.is_reserved_reply(reply) {
        inner
            .counters
            .replies_refused
            .fetch_add(1, Ordering::Relaxed);
        debug!(subject = %msg.subject, reply, "not answering into our own subject space");
        return None;
    }
    Some(reply)
}

async fn answer_srv(
    inner: Arc<Inner>,
    mut requests: impl futures::Stream<Item = (&'static str, Message)> + Unpin,
) {
    loop {
        let next = tokio::select! {
            n = requests.next() => n,
            _ = inner.stop.cancelled() => return,
        };
        let Some((verb, msg)) = next else { return };
        let Some(reply) = usable_reply(&inner, &msg) else {
            continue;
        };
        let body = match verb {
            "PING" => ping(&inner),
            "INFO" => info(&inner),
            _ => stats(&inner),
        };
        let Ok(bytes) = serde_json::to_vec(&body) else {
            continue;
        };
        let answer_on = inner.replies.as_ref().unwrap_or(&inner.client);
        if let Err(e) = answer_on.publish(reply.to_string(), bytes.into()).await {
            warn!(error = %e, "could not answer a services-API request");
        }
    }
}

fn identity(inner: &Inner, kind: &str) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("type".into(), json!(format!("io.nats.micro.v1.{kind}")));
    m.insert("name".into(), json!(inner.spec.name));
    m.insert("id".into(), json!(inner.id));
    m.insert("version".into(), json!(inner.spec.version));
    m.insert("metadata".into(), json!(inner.spec.metadata));
    m
}

fn ping(inner: &Inner) -> Value {
    Value::Object(identity(inner, "ping_response"))
}

fn info(inner: &Inner) -> Value {
    let mut m = identity(inner, "info_response");
    m.insert("description".into(), json!(inner.spec.description));
    let endpoints: Vec<Value> = inner
        .endpoints
        .lock()
        .map(|e| {
            e.iter()
                .map(|s| {
                    json!({
                        "name": s.name,
                        "subject": s.subject,
                        "queue_group": inner.spec.queue_group,
                        "metadata": {},
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    m.insert("endpoints".into(), json!(endpoints));
    Value::Object(m)
}

fn stats(inner: &Inner) -> Value {
    let mut m = identity(inner, "stats_response");
    m.insert("started".into(), json!(inner.started));
    let endpoints: Vec<Value> = inner
        .endpoints
        .lock()
        .map(|e| {
            e.iter()
                .map(|s| {
                    let requests = s.requests.load(Ordering::Relaxed);
                    let ns = s.processing_ns.load(Ordering::Relaxed);
                    json!({
                        "name": s.name,
                        "subject": s.subject,
                        "queue_group": inner.spec.queue_group,
                        "num_requests": requests,
                        "num_errors": s.errors.load(Ordering::Relaxed),
                        "last_error": s.last_error.lock().map(|l| l.clone()).unwrap_or_default(),
                        "processing_time": ns,
                        "average_processing_time": ns.checked_div(requests).unwrap_or(0),
                        "data": (inner.data)(&s.name),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    m.insert("endpoints".into(), json!(endpoints));
    m.insert(
        "replies_refused".into(),
        json!(inner.counters.replies_refused.load(Ordering::Relaxed)),
    );
    m.insert(
        "malformed_requests".into(),
        json!(inner.counters.malformed_requests.load(Ordering::Relaxed)),
    );
    // How often this connection (re)connected: 1 on a steady one.
    m.insert(
        "connects".into(),
        json!(inner.client.statistics().connects.load(Ordering::Relaxed)),
    );
    let (mut drops, mut connections) = (0, serde_json::Map::new());
    if let Ok(w) = inner.watched.lock() {
        for c in w.iter() {
            drops += c
                .client
                .statistics()
                .dropped_messages
                .load(Ordering::Relaxed);
            connections.insert(c.name.clone(), c.events.snapshot(&c.client));
        }
    }
    m.insert("slow_consumer_drops".into(), json!(drops));
    m.insert("connections".into(), Value::Object(connections));
    Value::Object(m)
}

/// The requests of one endpoint.
pub struct Endpoint {
    /// One subscription per request connection, with the connection that answers
    /// what it delivers.
    subs: Vec<(async_nats::Client, Subscriber)>,
    /// Where the next poll starts, so no connection is starved.
    turn: usize,
    stats: Arc<EndpointStats>,
    inner: Arc<Inner>,
    draining: bool,
}

impl Endpoint {
    /// The next request; none once the subscription ends. Requests whose reply
    /// subject is reserved are dropped here, unanswered and counted.
    pub async fn next(&mut self) -> Option<Request> {
        loop {
            let (i, msg) = self.next_message().await?;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let reply = usable_reply(&self.inner, &msg).map(str::to_string);
            let malformed = malformed(&msg);
            if malformed.is_some() {
                self.inner
                    .counters
                    .malformed_requests
                    .fetch_add(1, Ordering::Relaxed);
            }
            if reply.is_none() && msg.reply.is_some() {
                continue;
            }
            return Some(Request {
                reply,
                message: msg,
                malformed,
                stats: Arc::clone(&self.stats),
                client: self.subs[i].0.clone(),
                started: Instant::now(),
            });
        }
    }

    /// The next message of any subscription, in turn, with the subscription's index;
    /// none once every subscription has ended.
    async fn next_message(&mut self) -> Option<(usize, Message)> {
        futures::future::poll_fn(|cx| {
            let n = self.subs.len();
            let mut ended = 0;
            for k in 0..n {
                let i = (self.turn + k) % n;
                match self.subs[i].1.poll_next_unpin(cx) {
                    std::task::Poll::Ready(Some(m)) => {
                        self.turn = i + 1;
                        return std::task::Poll::Ready(Some((i, m)));
                    }
                    std::task::Poll::Ready(None) => ended += 1,
                    std::task::Poll::Pending => {}
                }
            }
            if ended == n {
                std::task::Poll::Ready(None)
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// Stops taking requests (the queue group then delivers to other replicas).
    pub async fn stop(&mut self) {
        for (_, sub) in self.subs.iter_mut() {
            let _ = sub.unsubscribe().await;
        }
    }

    /// Stops taking new requests but keeps those already on their way: [`Endpoint::next`]
    /// yields them, then none (NATS drain: unsubscribe, then a round trip).
    pub async fn drain(&mut self) {
        self.draining = true;
        for (_, sub) in self.subs.iter_mut() {
            if let Err(e) = sub.drain().await {
                warn!(error = %e, endpoint = %self.stats.name, "could not drain");
            }
        }
    }

    /// Whether [`Endpoint::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining
    }
}

/// Why a request is not served: a typed code (schemas/errors.md) and a message for
/// the client. Every service answers it the same way ([`Request::refuse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The typed reason.
    pub code: ErrorCode,
    /// What to tell the client.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// One request; answer it once with [`Request::respond`] or [`Request::refuse`].
#[derive(Debug)]
pub struct Request {
    reply: Option<String>,
    message: Message,
    malformed: Option<String>,
    stats: Arc<EndpointStats>,
    client: async_nats::Client,
    started: Instant,
}

impl Request {
    /// The request's message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Why the client library could not parse the request, if it could not: its
    /// headers are then absent and its subject may hold replacement characters.
    pub fn malformed(&self) -> Option<&str> {
        self.malformed.as_deref()
    }

    /// Answers with `payload`.
    pub async fn respond(&self, payload: Bytes) -> Result<()> {
        self.send(None, payload).await
    }

    /// Answers with a typed refusal: an empty body and the headers `Ts-Error` (the
    /// code), `Nats-Service-Error-Code` (HTTP-like status) and `Nats-Service-Error`.
    pub async fn refuse(&self, refusal: &Refusal) -> Result<()> {
        let (code, message) = (refusal.code.as_str(), refusal.message.as_str());
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.stats.last_error.lock() {
            *last = format!("{code}: {message}");
        }
        let mut h = HeaderMap::new();
        h.insert(subjects::ERROR, code);
        h.insert(
            subjects::SERVICE_ERROR_CODE,
            refusal.code.status().to_string().as_str(),
        );
        // A header value is one line: keep the message on one, and short (it may
        // quote what the client sent, which can be as large as a request).
        h.insert(
            subjects::SERVICE_ERROR,
            bounded(&message.replace(['\r', '\n'], " "), MAX_ERROR_MESSAGE).as_str(),
        );
        self.send(Some(h), Bytes::new()).await
    }

    async fn send(&self, headers: Option<HeaderMap>, payload: Bytes) -> Result<()> {
        self.stats
            .processing_ns
            .fetch_add(self.started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let Some(reply) = &self.reply else {
            return Ok(());
        };
        let r = match headers {
            Some(h) => {
                self.client
                    .publish_with_headers(reply.clone(), h, payload)
                    .await
            }
            None => self.client.publish(reply.clone(), payload).await,
        };
        r.map_err(|e| Error::Publish {
            subject: reply.clone(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_cut_on_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        let long = "é".repeat(600);
        let cut = bounded(&long, MAX_ERROR_MESSAGE);
        assert!(cut.len() <= MAX_ERROR_MESSAGE, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.len() > MAX_ERROR_MESSAGE - 8);
    }
}
