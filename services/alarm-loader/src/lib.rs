//! The alarm-loader: alarms and cron schedules fired into the log.
//!
//! # Layout
//! - [`cron`]: pure cron logic: parsing schedules (cron fields, aliases, `@every`),
//!   time zones and the daylight-saving policy, the next ticks, missed runs, tick ids.
//! - [`error`]: the crate's error type.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cron;
pub mod error;

pub use error::{Error, Result};
