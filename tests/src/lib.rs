//! turnstile's system tests (one binary: `cargo test -p tests`) and the benchmark
//! (`src/bin/bench.rs`). Every test starts its own nats-server through `harness`.
//!
//! # Layout
//! - [`support`]: starting schedulers (in-process or as processes), clients, keys.
//! - `scheduling`: slots, replicas, crashes, restarts, idempotency, modes.
//! - `refusals`: typed errors for bad input, nothing written.
//! - `integrity`: verification, tampering on disk, receipts, range pages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod support;

#[cfg(test)]
mod integrity;
#[cfg(test)]
mod refusals;
#[cfg(test)]
mod scheduling;
