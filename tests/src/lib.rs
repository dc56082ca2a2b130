//! turnstile's system tests (one binary: `cargo test -p tests`) and the benchmark
//! (`src/bin/bench.rs`). Every test starts its own nats-server through `harness`.
//!
//! # Layout
//! - [`support`]: starting schedulers (in-process or as processes), clients, keys.
//! - `scheduling`: slots, replicas, crashes, restarts, idempotency, modes.
//! - `refusals`: typed errors for bad input, nothing written.
//! - `integrity`: verification, tampering on disk, receipts, range pages.
//! - `malformed`: messages async-nats cannot parse are delivered, marked; the connection stays.
//! - `privilege`: who may do what with deploy/'s users (no credentials, intake, operator).
//! - [`raw`]: a raw NATS protocol client for hostile input.
//! - `bad_input`: malformed and hostile requests mixed into load, as raw bytes.
//! - `word`: the scheduler keeps its word (stalls, bursts, limits, races).
//! - `hostile`: foreign messages on the log, replies aimed into our own space.
//! - `alarms`: the alarm-loader: firing once, cancel, replace, crashes, outages, subject targets.
//! - `alarm_cli`: `turnstile alarm set|get|list|cancel` as the binary: output, refusals, usage errors.
//! - `cron_cli`: `turnstile cron add|get|list|activate|deactivate|delete|next` as the binary.
//! - `alarm_hostile`: the alarm-loader attacked: raw cron requests, forged and replayed
//!   records, a loader stalled mid-burst.
//! - `cron_jobs`: cron jobs: once per tick across loaders, overlap, deletion, missed ticks, broadcast.
//! - `keys_history`: required keys decided from the log (declared per run, handed over).
//! - `cluster`: a three-node cluster: an R3 stream across a leader's death, the
//!   scheduler started on a cluster that has just formed, misconfigurations refused.
//! - `ownership`: partitions split among live members, handovers, crashes, stalls, restarts.
//! - `queue_keys`: Ts-Queue-Key: refused while its job waits, freed when it starts.
//! - `workers`: worker groups: every job once, an instance killed mid-job, foreign runs.
//! - `exec_keys`: execution keys: never two jobs of a key at once, a dead holder's key
//!   freed after its lease and its token stale, hostile header values.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod raw;
pub mod support;

#[cfg(test)]
mod alarm_cli;
#[cfg(test)]
mod alarm_hostile;
#[cfg(test)]
mod alarms;
#[cfg(test)]
mod bad_input;
#[cfg(test)]
mod cluster;
#[cfg(test)]
mod cron_cli;
#[cfg(test)]
mod cron_jobs;
#[cfg(test)]
mod exec_keys;
#[cfg(test)]
mod hostile;
#[cfg(test)]
mod integrity;
#[cfg(test)]
mod keys_history;
#[cfg(test)]
mod malformed;
#[cfg(test)]
mod ownership;
#[cfg(test)]
mod privilege;
#[cfg(test)]
mod queue_keys;
#[cfg(test)]
mod refusals;
#[cfg(test)]
mod scheduling;
mod verify_cli;
#[cfg(test)]
mod word;
#[cfg(test)]
mod workers;
