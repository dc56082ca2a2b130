//! `turnstile workers`, `turnstile worker inspect`, `turnstile job get`, `turnstile
//! jobs`: worker groups, their live instances, and every job's history.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use clap::Subcommand;
use futures::StreamExt;
use serde_json::Value;

use journal::subjects::Subjects;
use protocol::ProcessId;

/// `turnstile worker …`.
#[derive(Subcommand, Debug)]
pub enum WorkerAction {
    /// One instance as it is now: status, the jobs in its buffer (with push times), the
    /// jobs it runs (with push and start times), its counters and recent events.
    Inspect {
        /// The instance id (`turnstile workers` lists them).
        id: String,
    },
}

/// `turnstile queue …` (the operator's: writes the workers bucket).
#[derive(Subcommand, Debug)]
pub enum QueueAction {
    /// No instance of the group starts a job of it (or of one process) from now on,
    /// until resumed; survives restarts. Jobs already running finish.
    Pause {
        /// The worker group.
        group: String,
        /// Only this process's jobs.
        #[arg(long)]
        process: Option<String>,
    },
    /// Lifts a pause.
    Resume {
        /// The worker group.
        group: String,
        /// The process whose pause is lifted (a group pause is lifted without it).
        #[arg(long)]
        process: Option<String>,
    },
    /// Shows the hold of a queue key (Ts-Queue-Key) in a process; `--release` removes
    /// it (for a hold whose job's instance could not free it: the key is taken again
    /// by the next request).
    Key {
        /// The process.
        process: String,
        /// The queue key, as requests carry it.
        key: String,
        /// Remove the hold (expecting the revision shown).
        #[arg(long)]
        release: bool,
    },
}

/// `turnstile job …`.
#[derive(Subcommand, Debug)]
pub enum JobAction {
    /// Cancels a job in a group (the operator's): skipped and recorded `cancelled`
    /// when it reaches an instance, stopped if it is running (a `command`'s child is
    /// killed). By slot, or by the message id the log holds (`--id`).
    Cancel {
        /// The worker group.
        group: String,
        /// The process.
        process: String,
        /// The slot.
        #[arg(required_unless_present = "id")]
        slot: Option<u64>,
        /// The message id instead of the slot (found in the verified log).
        #[arg(long, conflicts_with = "slot")]
        id: Option<String>,
    },
    /// A job's history in a group, one JSON event a line (done, failed with its
    /// attempt, dead, cancelled, merged). Exit status 1: no event yet.
    Get {
        /// The worker group.
        group: String,
        /// The process.
        process: String,
        /// The slot.
        slot: u64,
    },
}

/// The live instances of every worker group (services-API INFO), grouped.
pub async fn workers(nats: async_nats::Client) -> Result<i32> {
    let answers = service::ask_all(
        &nats,
        "INFO",
        "turnstile-worker",
        Duration::from_millis(500),
    )
    .await?;
    let mut groups: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for info in answers {
        let group = info["metadata"]["group"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        groups.entry(group).or_default().push(serde_json::json!({
            "id": info["id"],
            "buffer": info["metadata"]["buffer"],
            "concurrency": info["metadata"]["concurrency"],
            "ordering": info["metadata"]["ordering"],
            "version": info["version"],
        }));
    }
    for (group, instances) in groups {
        println!(
            "{}",
            serde_json::json!({ "group": group, "instances": instances })
        );
    }
    Ok(0)
}

/// `turnstile worker inspect <id>`.
pub async fn worker(
    nats: async_nats::Client,
    subjects: &Subjects,
    action: WorkerAction,
) -> Result<i32> {
    match action {
        WorkerAction::Inspect { id } => {
            if id.is_empty() || id.contains(['.', '*', '>', ' ']) {
                bail!("instance id {id:?}: one token, as `turnstile workers` shows it");
            }
            let reply = tokio::time::timeout(
                Duration::from_secs(5),
                nats.request(subjects.worker_inspect(&id), Bytes::new()),
            )
            .await
            .context("no answer within 5 s")?
            .with_context(|| format!("no instance {id} answers"))?;
            let v: Value = serde_json::from_slice(&reply.payload)
                .context("the instance's answer is not JSON")?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }
    }
}

/// The workers bucket, for the operator's writes.
async fn workers_bucket(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<jetstream::kv::Store> {
    js.get_key_value(subjects.workers_bucket())
        .await
        .context("no workers bucket (no worker group has started yet?)")
}

/// `turnstile queue pause|resume`.
pub async fn queue(
    nats: async_nats::Client,
    subjects: &Subjects,
    action: QueueAction,
) -> Result<i32> {
    let js = jetstream::new(nats);
    let (group, process, pause) = match action {
        QueueAction::Pause { group, process } => (group, process, true),
        QueueAction::Resume { group, process } => (group, process, false),
        QueueAction::Key {
            process,
            key,
            release,
        } => return queue_key(&js, subjects, process, key, release).await,
    };
    let kv = workers_bucket(&js, subjects).await?;
    check_group(&group)?;
    if let Some(p) = &process {
        ProcessId::new(p.clone())?;
    }
    let key = worker::control::pause_key(&group, process.as_deref());
    if pause {
        kv.put(&key, Bytes::from_static(b"paused")).await?;
    } else {
        journal::setup::purge_released(&kv, &key, None).await?;
    }
    println!(
        "{}",
        serde_json::json!({"group": group, "process": process, "paused": pause})
    );
    Ok(0)
}

/// `turnstile queue key`.
async fn queue_key(
    js: &jetstream::Context,
    subjects: &Subjects,
    process: String,
    key: String,
    release: bool,
) -> Result<i32> {
    let p = ProcessId::new(process)?;
    protocol::queue::check_key(&key)?;
    let kv = js
        .get_key_value(subjects.queue_keys_bucket())
        .await
        .context("no queue-keys bucket (no scheduler has started yet?)")?;
    let name = protocol::queue::hold_key(&p, &key);
    let entry = kv
        .entry(&name)
        .await?
        .filter(|e| e.operation == jetstream::kv::Operation::Put);
    let hold: Option<Value> = entry
        .as_ref()
        .map(|e| serde_json::from_slice(&e.value).unwrap_or(Value::Null));
    let mut released = false;
    if let (true, Some(e)) = (release, &entry) {
        journal::setup::purge_released(&kv, &name, Some(e.revision)).await?;
        released = true;
    }
    println!(
        "{}",
        serde_json::json!({
            "process": p.as_str(),
            "key": key,
            "bucket_key": name,
            "held": entry.is_some() && !released,
            "hold": hold,
            "revision": entry.as_ref().map(|e| e.revision),
            "released": released,
        })
    );
    Ok(0)
}

fn check_group(group: &str) -> Result<()> {
    if !journal::subjects::is_ownership_token(group) || group.len() > 48 {
        bail!("group {group:?}: 1–48 characters of A-Z a-z 0-9 - _");
    }
    Ok(())
}

/// The state of the last event in a job's history (`subject`), if it has one.
async fn last_state(
    js: &jetstream::Context,
    subjects: &Subjects,
    subject: &str,
) -> Result<Option<String>> {
    let last = read(
        js.client(),
        subjects,
        subject.to_string(),
        consumer::DeliverPolicy::Last,
    )
    .await?
    .pop();
    Ok(last.and_then(|e| e["state"].as_str().map(str::to_string)))
}

/// `turnstile job get|cancel`.
pub async fn job(nats: async_nats::Client, subjects: &Subjects, action: JobAction) -> Result<i32> {
    match action {
        JobAction::Cancel {
            group,
            process,
            slot,
            id,
        } => {
            check_group(&group)?;
            let p = ProcessId::new(process)?;
            let js = jetstream::new(nats);
            let slot = match (slot, id) {
                (Some(s), _) => s,
                (None, Some(id)) => match slot_of_id(&js, subjects, &p, &id).await? {
                    Some(s) => s,
                    None => bail!("no assignment of {p} holds message id {id:?}"),
                },
                (None, None) => bail!("a slot or --id"),
            };
            let kv = workers_bucket(&js, subjects).await?;
            let key = worker::control::cancel_key(&group, p.as_str(), slot);
            let subject = subjects.result(&group, &p, slot);
            let already = |state: Option<&str>| {
                println!(
                    "{}",
                    serde_json::json!({"group": group, "process": p.as_str(), "slot": slot, "cancelled": false, "already": state})
                );
            };
            // A job already cancelled is not cancelled again: its cancel would be kept
            // for good (the instance that recorded it deleted its own). Read before the
            // write: once written, a `cancelled` in the history may be this cancel's.
            let before = last_state(&js, subjects, &subject).await?;
            if before.as_deref() == Some("cancelled") {
                already(before.as_deref());
                return Ok(1);
            }
            kv.put(&key, Bytes::from_static(b"cancelled")).await?;
            // Written first, then the history read: a job already final (done, dead,
            // merged) never runs again, so its cancel is taken back at once rather
            // than kept for good (an instance deletes a cancel once it has recorded
            // its job final). Read after the write, so a job that ends meanwhile is
            // seen either here or by its instance.
            let after = last_state(&js, subjects, &subject).await?;
            match after.as_deref() {
                Some(state @ ("done" | "dead" | "merged")) => {
                    journal::setup::purge_released(&kv, &key, None).await?;
                    already(Some(state));
                    return Ok(1);
                }
                // Cancelled since the read before: by this cancel (its instance purges
                // the key too) or by another that raced it (whose instance purged only
                // its own write): taken back, as the job is final either way.
                Some("cancelled") => journal::setup::purge_released(&kv, &key, None).await?,
                _ => {}
            }
            println!(
                "{}",
                serde_json::json!({"group": group, "process": p.as_str(), "slot": slot, "cancelled": true})
            );
            Ok(0)
        }
        JobAction::Get {
            group,
            process,
            slot,
        } => {
            check_group(&group)?;
            let p = ProcessId::new(process)?;
            let subject = subjects.result(&group, &p, slot);
            let events = read(nats, subjects, subject, consumer::DeliverPolicy::All).await?;
            for e in &events {
                println!("{e}");
            }
            Ok(if events.is_empty() { 1 } else { 0 })
        }
    }
}

/// `turnstile jobs <group> <process> [--state S]`: each job's last event.
pub async fn jobs(
    nats: async_nats::Client,
    subjects: &Subjects,
    group: String,
    process: String,
    state: Option<String>,
) -> Result<i32> {
    check_group(&group)?;
    let p = ProcessId::new(process)?;
    let subject = subjects.results_of(&group, &p);
    let events = read(
        nats,
        subjects,
        subject,
        consumer::DeliverPolicy::LastPerSubject,
    )
    .await?;
    let mut by_slot: BTreeMap<u64, Value> = BTreeMap::new();
    for e in events {
        if let Some(slot) = e["slot"].as_u64() {
            by_slot.insert(slot, e);
        }
    }
    for e in by_slot.values() {
        if state.as_deref().is_none_or(|s| e["state"] == s) {
            println!("{e}");
        }
    }
    Ok(0)
}

/// Every message on `subject` of the results stream (JSON events), by `deliver`.
async fn read(
    nats: async_nats::Client,
    subjects: &Subjects,
    subject: String,
    deliver: consumer::DeliverPolicy,
) -> Result<Vec<Value>> {
    let js = jetstream::new(nats);
    let stream = js
        .get_stream(subjects.results_stream())
        .await
        .context("no results stream (no worker group has run yet?)")?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy: deliver,
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let mut msgs = consumer.messages().await?;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(10), msgs.next())
        .await
        .context("the results stream stopped answering")?
    {
        let m = m?;
        let remaining = m.info().map(|i| i.pending).unwrap_or(0);
        if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
            out.push(v);
        }
        if remaining == 0 {
            break;
        }
    }
    Ok(out)
}

/// The slot of `process`'s assignment with message id `id`, from the verified log.
async fn slot_of_id(
    js: &jetstream::Context,
    subjects: &Subjects,
    process: &ProcessId,
    id: &str,
) -> Result<Option<u64>> {
    let keys = journal::setup::open_bucket(js, &subjects.keys_bucket()).await?;
    let trusted = journal::keyring::trust(&journal::keyring::fetch(&keys).await?);
    let reader = journal::reader::LogReader::open(js.clone(), subjects.clone()).await?;
    let mut judged = journal::chain::from_slot(&reader, process, &trusted, 0, false).await?;
    while let Some(j) = judged.next().await {
        if let journal::chain::Judged::Chain { run, .. } = j? {
            if let Some(e) = run.run.entries.iter().find(|e| e.message_id == id) {
                return Ok(Some(e.slot));
            }
        }
    }
    Ok(None)
}
