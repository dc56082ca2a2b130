//! The alarm-loader: alarms (messages due at a time) and cron schedules, persisted in
//! JetStream and fired into the log (or to any subject) on time, exactly once per due
//! time, across replicas and crashes. See ARCHITECTURE.md, "The alarm-loader", and
//! schemas/alarms.md.
//!
//! # Layout
//! - [`alarm`]: the records (pure): an alarm, its events, its state machine.
//! - [`cron`]: pure cron logic: parsing schedules (cron fields, aliases, `@every`),
//!   time zones and the daylight-saving policy, the next ticks, missed runs, tick ids.
//! - [`store`]: the stream `<PREFIX>_ALARMS`: histories, the due index, compare-and-set.
//! - [`loader`]: the window loader and the dispatcher.
//! - `timeline` (private): the loader's timer and window decisions, pure: which
//!   buckets a load reads and when, the armed alarms' order, when the loop wakes, how a
//!   dispatch's conclusion re-arms an alarm.
//! - [`api`]: the `<prefix>.alarm.*` requests.
//! - [`vectors`]: the golden vectors of `schemas/alarm-vectors.json`.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod alarm;
pub mod api;
pub mod cron;
mod error;
pub mod jobs;
pub mod loader;
pub mod store;
mod timeline;
pub mod vectors;

pub use error::{Error, Result};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use protocol::wire::ErrorCode;
use service::Refusal;

/// The connections of a loader.
#[derive(Debug, Clone)]
pub struct Connections {
    /// The loader's own user (`alarm-loader`): the alarm stream, scheduling into
    /// processes.
    pub core: async_nats::Client,
    /// The public side (`alarm-intake`, in the clients' account): the alarm requests
    /// and the services API, and requests to subject targets; none: the core
    /// connection.
    pub intake: Option<async_nats::Client>,
    /// Their events, for STATS.
    pub events: Arc<service::ConnectionEvents>,
}

/// What a loader is told at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Subject prefix.
    pub prefix: String,
    /// Replicas of the alarm stream when this loader creates it.
    pub replicas: usize,
    /// The loader's timing.
    pub loader: loader::Config,
    /// Requests answered at once (past it: `busy` at once); [`MAX_ANSWERING`] by
    /// default.
    pub max_answering: usize,
}

/// Runs a loader replica until `shutdown`: the `<prefix>.alarm.*` endpoint, the window
/// loader and the dispatcher.
pub async fn run(
    settings: Settings,
    connections: Connections,
    shutdown: CancellationToken,
    clock: loader::Clock,
) -> Result<()> {
    let subjects = journal::subjects::Subjects::new(&settings.prefix)
        .map_err(|e| Error::Invalid(format!("prefix: {e}")))?;
    let core = connections.core.clone();
    journal::setup::check_server(&core)?;
    let js = async_nats::jetstream::new(core.clone());
    let options = journal::setup::LogOptions {
        replicas: settings.replicas,
        retry: journal::retry::Retry::new(journal::retry::Backoff::default())
            .watching(connections.events.clone()),
    };
    let store = store::Store::open(js.clone(), subjects.clone(), &options).await?;
    let intake = connections.intake.clone().unwrap_or_else(|| core.clone());
    let scheduler = journal::client::Client::new(core.clone(), subjects.clone());
    let loader = loader::Loader::new(
        store.clone(),
        scheduler,
        intake.clone(),
        settings.loader.clone(),
        Arc::clone(&clock),
    );
    let metrics = loader.metrics();
    let spec = service::Spec {
        name: "turnstile-alarm-loader".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: "alarms and cron schedules fired into the log".into(),
        queue_group: "turnstile-alarm-loader".into(),
        metadata: std::collections::HashMap::from([
            ("bucket_ms".to_string(), alarm::BUCKET_MS.to_string()),
            ("partitions".to_string(), alarm::PARTITIONS.to_string()),
            ("max_body".to_string(), alarm::MAX_BODY.to_string()),
            (
                "in_memory_interval_ms".to_string(),
                settings.loader.in_memory_interval.as_millis().to_string(),
            ),
        ]),
    };
    let svc = service::Service::start(intake.clone(), spec, subjects.clone(), move |_| {
        metrics.snapshot()
    })
    .await?;
    svc.watch("core", core.clone(), Arc::clone(&connections.events));
    if let Some(i) = &connections.intake {
        svc.watch("intake", i.clone(), Arc::clone(&connections.events));
    }
    let alarms = svc.endpoint("alarm", subjects.alarm_requests()).await?;
    let crons = svc.endpoint("cron", subjects.cron_requests()).await?;
    intake.flush().await.map_err(|e| Error::js("flush", e))?;
    svc.announce().await?;
    info!(prefix = %subjects.prefix(), replica = %settings.loader.replica, "alarm-loader ready");

    let tasks = tokio_util::task::TaskTracker::new();
    let loader_task = tasks.spawn(loader.run(js, shutdown.clone()));
    // Answers in progress are finished before the process ends.
    let answering = tokio_util::task::TaskTracker::new();
    let ctx = Answering {
        store: store.clone(),
        clock: Arc::clone(&clock),
        subjects: subjects.clone(),
        tracker: answering.clone(),
        room: Arc::new(tokio::sync::Semaphore::new(settings.max_answering.max(1))),
        max_answering: settings.max_answering.max(1),
    };
    let requests = [
        tasks.spawn(serve(alarms, Kind::Alarm, ctx.clone(), shutdown.clone())),
        tasks.spawn(serve(crons, Kind::Cron, ctx, shutdown.clone())),
    ];
    tasks.close();
    let result = loader_task.await;
    shutdown.cancel();
    for r in requests {
        let _ = r.await;
    }
    answering.close();
    answering.wait().await;
    svc.stop();
    let _ = core.flush().await;
    let _ = intake.flush().await;
    info!("alarm-loader stopped");
    match result {
        Ok(r) => r,
        Err(e) => Err(Error::Invalid(format!("loader task: {e}"))),
    }
}

/// Which requests an endpoint takes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `<prefix>.alarm.<op>`.
    Alarm,
    /// `<prefix>.cron.<op>`.
    Cron,
}

/// Requests a loader answers at once by default (both endpoints); one more is refused
/// `busy` at once, so a flood costs bounded memory and every request still gets its
/// answer.
pub const MAX_ANSWERING: usize = 8192;

/// How soon a request refused `busy` for lack of room may come again.
const BUSY_RETRY_MS: u64 = 100;

/// What answering needs.
#[derive(Clone)]
struct Answering {
    store: store::Store,
    clock: loader::Clock,
    subjects: journal::subjects::Subjects,
    tracker: tokio_util::task::TaskTracker,
    /// Room for requests being answered (`max_answering` permits).
    room: Arc<tokio::sync::Semaphore>,
    /// The room's size.
    max_answering: usize,
}

/// Takes `endpoint`'s requests until `shutdown`, then drains it: each answered on a
/// task of its own, at most `max_answering` at once (past that, `busy` at once).
async fn serve(
    mut endpoint: service::Endpoint,
    kind: Kind,
    ctx: Answering,
    shutdown: CancellationToken,
) {
    loop {
        let req = tokio::select! {
            r = endpoint.next() => r,
            _ = shutdown.cancelled() => {
                endpoint.drain().await;
                tokio::time::timeout(Duration::from_secs(5), endpoint.next()).await.unwrap_or_default()
            }
        };
        let Some(req) = req else { break };
        let Ok(permit) = Arc::clone(&ctx.room).try_acquire_owned() else {
            let why = format!(
                "{} requests are being answered; retry in {BUSY_RETRY_MS} ms",
                ctx.max_answering
            );
            if let Err(e) = req.refuse(&Refusal::new(ErrorCode::Busy, why)).await {
                warn!(error = %e, "answer not sent");
            }
            continue;
        };
        let ctx2 = ctx.clone();
        // Boxed: the task then holds a pointer, not the whole (large) answer future,
        // which tokio moved at spawn and at completion (a tenth of the loader's CPU
        // under a flood of sets).
        ctx.tracker.spawn(Box::pin(async move {
            let _permit = permit;
            answer(&ctx2, kind, req).await
        }));
    }
}

/// Answers one request.
async fn answer(ctx: &Answering, kind: Kind, req: service::Request) {
    if let Some(why) = req.malformed() {
        let _ = req
            .refuse(&Refusal::new(ErrorCode::MalformedRequest, why))
            .await;
        return;
    }
    let subject = req.message().subject.as_str();
    let rest = subject.strip_prefix(ctx.subjects.prefix()).unwrap_or("");
    let body = &req.message().payload;
    let result = match kind {
        Kind::Alarm => {
            let op = rest.strip_prefix(".alarm.").unwrap_or("");
            api::handle(&ctx.store, &ctx.clock, op, body).await
        }
        Kind::Cron => {
            let op = rest.strip_prefix(".cron.").unwrap_or("");
            api::handle_cron(&ctx.store, &ctx.clock, op, body).await
        }
    };
    let sent = match result {
        Ok(v) => match serde_json::to_vec(&v) {
            Ok(body) => req.respond(Bytes::from(body)).await,
            Err(e) => {
                req.refuse(&Refusal::new(ErrorCode::Internal, e.to_string()))
                    .await
            }
        },
        Err(r) => req.refuse(&r).await,
    };
    if let Err(e) = sent {
        warn!(error = %e, "answer not sent");
    }
}
