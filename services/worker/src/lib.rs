//! Workers: independently scaled groups of instances that run the jobs of the
//! assignment log. This crate is both the `worker` service and the library Rust users
//! build their own workers with ([`run`] with any [`handler::Handler`]). See
//! ARCHITECTURE.md, "Workers", and schemas/workers.md.
//!
//! # Layout
//! - [`job`]: jobs, results and faults as stored (pure).
//! - [`buffer`]: an instance's buffer: queue, bounded, dropbox (pure).
//! - [`control`]: cancelled jobs and paused queues, cluster-wide (the workers bucket).
//! - [`exec_keys`]: execution keys: jobs with the same key never run at once.
//! - [`handler`]: the [`handler::Handler`] trait and the `command` handler.
//! - [`feeder`]: one per group: the log, verified, into one job per assignment.
//! - [`queue`]: queue keys: a job frees its key's hold when it leaves the queue.
//! - [`instance`]: fetch, run, record, keep alive, introspect, drain.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod buffer;
pub mod control;
mod error;
pub mod exec_keys;
pub mod feeder;
pub mod handler;
pub mod instance;
pub mod job;
pub mod queue;

pub use error::{Error, Result};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use journal::subjects::Subjects;

/// The connections of an instance.
#[derive(Debug, Clone)]
pub struct Connections {
    /// The worker's user (`worker` in deploy/accounts.conf): reads the log, feeds and
    /// consumes the work stream, writes results; never the log.
    pub core: async_nats::Client,
    /// The public side (user `worker`, in the clients' account): the services API and
    /// introspection, so that any client finds and inspects the instances; none: the
    /// core connection.
    pub intake: Option<async_nats::Client>,
    /// Their events, for STATS.
    pub events: Arc<service::ConnectionEvents>,
}

/// What an instance is told at start.
#[derive(Clone)]
pub struct Settings {
    /// Subject prefix.
    pub prefix: String,
    /// Replicas of the streams and bucket when this instance creates them.
    pub replicas: usize,
    /// Which processes the group serves.
    pub serves: feeder::Serves,
    /// Where a new group starts in the log.
    pub from: feeder::From,
    /// The instance's behaviour.
    pub instance: instance::Config,
    /// The feeder's lease: a dead feeder is replaced after about this long.
    pub lease: Duration,
    /// Trust these keys (none: the scheduler's published keys).
    pub trusted: Option<protocol::verify::TrustedKeys>,
}

/// A group has one ordering: its unordered instances share the durable consumer
/// `group-<group>` over all its work subjects, its strict ones one consumer per work
/// partition, and the work stream (work-queue retention) refuses the two at once. An
/// instance whose ordering is not the one the group's consumers serve ends here with
/// one clear line while they are in use: a live instance of the other ordering
/// answers the services API's INFO (this instance, `me`, must answer too, or the
/// discovery is not trusted), or a pull request waits on one of them. Consumers of the
/// other ordering that nobody uses any more (the operator stopped every instance to
/// switch the group's ordering) are removed; the jobs they had delivered and not
/// acknowledged are delivered again through the new ones.
async fn one_ordering(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    intake: &async_nats::Client,
    me: &str,
    config: &instance::Config,
) -> Result<()> {
    use futures::TryStreamExt;
    let group = &config.group;
    let stream = js
        .get_stream(subjects.work_stream())
        .await
        .map_err(|e| Error::nats("open the work stream", e))?;
    let other = match config.order {
        instance::Order::Strict => instance::Order::Unordered,
        instance::Order::Unordered => instance::Order::Strict,
    };
    // A stopped instance's last pull request lingers until it expires (1 s): look
    // again before judging the consumers in use.
    let mut looks = 0;
    let others = loop {
        looks += 1;
        let consumers: Vec<async_nats::jetstream::consumer::Info> = stream
            .consumers()
            .try_collect()
            .await
            .map_err(|e| Error::nats("list the work stream's consumers", e))?;
        let others: Vec<_> = consumers
            .into_iter()
            .filter(|c| {
                instance::consumer_order(subjects, group, &c.config.filter_subject)
                    .is_some_and(|o| o != config.order)
            })
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        let waiting: usize = others.iter().map(|c| c.num_waiting).sum();
        let answers = service::ask_all(
            intake,
            "INFO",
            "turnstile-worker",
            Duration::from_millis(500),
        )
        .await
        .map_err(|e| Error::Service(e.to_string()))?;
        let seen_me = answers.iter().any(|i| i["id"].as_str() == Some(me));
        let live: Vec<&str> = answers
            .iter()
            .filter(|i| i["metadata"]["group"].as_str() == Some(group.as_str()))
            .filter(|i| i["metadata"]["ordering"].as_str() != Some(config.order.name()))
            .filter_map(|i| i["id"].as_str())
            .collect();
        if waiting == 0 && live.is_empty() && seen_me {
            break others;
        }
        if looks >= 3 {
            let why = if !live.is_empty() {
                format!("live instances: {}", live.join(", "))
            } else if waiting > 0 {
                format!("{waiting} pull requests wait on its consumers")
            } else {
                "whether instances of it are live cannot be told: not even this instance \
                 answered the services API's INFO"
                    .to_string()
            };
            return Err(Error::Config(format!(
                "group {group} runs with --ordering {} ({why}); this instance was started \
                 with --ordering {}: a group has one ordering — stop those instances first, \
                 or use another --group",
                other.name(),
                config.order.name()
            )));
        }
        tokio::time::sleep(Duration::from_millis(1_000)).await;
    };
    let removed: Vec<&str> = others.iter().map(|c| c.name.as_str()).collect();
    for name in &removed {
        stream
            .delete_consumer(name)
            .await
            .map_err(|e| Error::nats("remove the group's consumers of its old ordering", e))?;
    }
    warn!(
        %group,
        ?removed,
        "the group ran with --ordering {} and none of its instances is live: its consumers \
         were removed; this instance runs the group with --ordering {}",
        other.name(),
        config.order.name()
    );
    Ok(())
}

/// Runs one instance of a worker group until `shutdown`: the services API with its
/// introspection endpoint, a turn at feeding the group when it holds the feed lease,
/// and the jobs.
pub async fn run(
    settings: Settings,
    connections: Connections,
    handler: Arc<dyn handler::Handler>,
    shutdown: CancellationToken,
    clock: service::Clock,
) -> Result<()> {
    let group = settings.instance.group.clone();
    if !journal::subjects::is_ownership_token(&group) || group.len() > 48 {
        return Err(Error::Config(format!(
            "group {group:?}: 1–48 characters of A-Z a-z 0-9 - _"
        )));
    }
    let subjects =
        Subjects::new(&settings.prefix).map_err(|e| Error::Config(format!("prefix: {e}")))?;
    let core = connections.core.clone();
    journal::setup::check_server(&core)?;
    let js = async_nats::jetstream::new(core.clone());
    let options = journal::setup::LogOptions {
        replicas: settings.replicas,
        retry: journal::retry::Retry::new(journal::retry::Backoff::default())
            .watching(connections.events.clone()),
    };
    journal::setup::ensure_stream(
        &js,
        journal::setup::work_stream_config(&subjects, &options),
        &options,
    )
    .await?;
    journal::setup::ensure_stream(
        &js,
        journal::setup::results_stream_config(&subjects, &options),
        &options,
    )
    .await?;
    let kv = journal::setup::ensure_workers(&js, &subjects, &options).await?;
    let (trusted, keys) = match settings.trusted.clone() {
        Some(t) => (t, None),
        None => {
            // The scheduler makes the keys bucket; wait for it (a worker may start
            // first on a fresh deployment).
            let mut waited = 0u32;
            let keys = loop {
                match journal::setup::open_bucket(&js, &subjects.keys_bucket()).await {
                    Ok(k) => break k,
                    Err(e) => {
                        if waited.is_multiple_of(30) {
                            warn!("no scheduler keys bucket yet ({e}); waiting for a scheduler");
                        }
                        waited += 1;
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            };
            let t = journal::keyring::trust(&journal::keyring::fetch(&keys).await?);
            (t, Some(keys))
        }
    };
    if trusted.is_empty() && keys.is_none() {
        warn!("no trusted key: no run of the log can verify, so no job will be handed out");
    }

    let svc_spec = service::Spec {
        name: "turnstile-worker".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: "turnstile worker: runs the jobs of the assignment log".into(),
        queue_group: format!("turnstile-worker-{group}"),
        metadata: std::collections::HashMap::from([
            ("group".to_string(), group.clone()),
            (
                "buffer".to_string(),
                format!("{:?}", settings.instance.buffer),
            ),
            (
                "concurrency".to_string(),
                settings.instance.concurrency.to_string(),
            ),
            (
                "ordering".to_string(),
                settings.instance.order.name().to_string(),
            ),
        ]),
    };
    let feed_stats = Arc::new(feeder::FeedStats::default());
    let fs = Arc::clone(&feed_stats);
    let intake = connections.intake.clone().unwrap_or_else(|| core.clone());
    let svc = service::Service::start(intake.clone(), svc_spec, subjects.clone(), move |_| {
        use std::sync::atomic::Ordering::Relaxed;
        serde_json::json!({
            "feed_jobs": fs.jobs.load(Relaxed),
            "feed_runs": fs.runs.load(Relaxed),
            "feed_foreign": fs.foreign.load(Relaxed),
            "feed_checkpoint": fs.checkpoint.load(Relaxed),
            "feed_preloaded": fs.preloaded.load(Relaxed),
            "feed_loads": fs.loads.load(Relaxed),
            "feed_log_reads": fs.log_reads.load(Relaxed),
        })
    })
    .await
    .map_err(|e| Error::Service(e.to_string()))?;
    svc.watch("core", core.clone(), Arc::clone(&connections.events));
    if let Some(i) = &connections.intake {
        svc.watch("intake", i.clone(), Arc::clone(&connections.events));
    }
    let id = svc.id().to_string();
    let inspect = svc
        .endpoint("inspect", subjects.worker_inspect(&id))
        .await
        .map_err(|e| Error::Service(e.to_string()))?;

    let instance = instance::Instance::new(
        id.clone(),
        settings.instance.clone(),
        subjects.clone(),
        js.clone(),
        handler,
        clock,
        Some(kv.clone()),
    );
    let feed = feeder::Feed {
        group: group.clone(),
        serves: settings.serves.clone(),
        from: settings.from,
        subjects: subjects.clone(),
        js: js.clone(),
        kv,
        trusted: Arc::new(std::sync::RwLock::new(trusted)),
        keys,
        keys_read: Arc::default(),
        trusted_generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        stats: feed_stats,
    };
    // The group exists (its place in the log is fixed) before the instance says it
    // is ready: what is scheduled from then on is the group's.
    feed.start_point().await?;
    intake.flush().await.map_err(|e| Error::nats("flush", e))?;
    svc.announce()
        .await
        .map_err(|e| Error::Service(e.to_string()))?;
    // Announced first: the check asks the group's live instances, this one included.
    if let Err(e) = one_ordering(&js, &subjects, &intake, &id, &settings.instance).await {
        svc.stop();
        return Err(e);
    }
    info!(%group, instance = %id, "worker ready");

    let stop_feeding = CancellationToken::new();
    let feeding = tokio::spawn(feed_while_held(
        js.clone(),
        subjects.clone(),
        feed,
        id.clone(),
        settings.lease,
        settings.replicas,
        stop_feeding.clone(),
    ));
    let me = Arc::clone(&instance);
    // Introspection answers until the instance has closed (it shows `closing`).
    let answering = tokio::spawn(answer_inspect(me, inspect));
    let me = Arc::clone(&instance);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        me.trigger_shutdown();
    });
    let result = instance.run().await;
    stop_feeding.cancel();
    let _ = feeding.await;
    svc.stop();
    answering.abort();
    let _ = core.flush().await;
    let _ = intake.flush().await;
    info!(%group, instance = %id, "worker stopped");
    result
}

/// Joins the group's feed ownership (one partition) and feeds while holding it.
async fn feed_while_held(
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    feed: feeder::Feed,
    member: String,
    lease: Duration,
    replicas: usize,
    stop: CancellationToken,
) {
    let group = format!("feed-{}", feed.group);
    let mut config = match ownership::Config::new(&group, 1, lease, &member) {
        Ok(c) => c,
        Err(e) => {
            warn!("feed ownership: {e}");
            return;
        }
    };
    config.subjects = subjects;
    config.replicas = replicas;
    let mut membership = loop {
        match ownership::Membership::join(js.clone(), config.clone()).await {
            Ok(m) => break m,
            Err(e) => {
                warn!("joining the feed group: {e}; again in 1 s");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    loop {
        let lease = tokio::select! {
            _ = stop.cancelled() => break,
            l = membership.next_lease() => match l { Some(l) => l, None => break },
        };
        info!(group = %feed.group, "this instance feeds the group");
        while lease.is_current() && !stop.is_cancelled() {
            let token = lease.cancellation();
            let both = CancellationToken::new();
            let b2 = both.clone();
            let s2 = stop.clone();
            let watcher = tokio::spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = s2.cancelled() => {}
                }
                b2.cancel();
            });
            let r = feed.run(both).await;
            watcher.abort();
            if let Err(e) = r {
                warn!(group = %feed.group, "feeding stopped: {e}; resuming from the checkpoint");
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = lease.lost() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
        drop(lease);
    }
    let _ = membership.leave().await;
}

async fn answer_inspect(instance: Arc<instance::Instance>, mut endpoint: service::Endpoint) {
    while let Some(req) = endpoint.next().await {
        let body = instance
            .inspect()
            .and_then(|i| serde_json::to_vec(&i).ok())
            .unwrap_or_default();
        let _ = req.respond(Bytes::from(body)).await;
    }
}
