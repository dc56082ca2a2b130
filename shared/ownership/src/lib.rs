//! Cluster-wide ownership: a named group (e.g. `alarm-loader`) splits a fixed number of
//! partitions among its live members, each partition held by at most one member at a
//! time, through leases in a JetStream KV bucket (`TS_OWNERSHIP`).
//!
//! ```text
//! let mut m = Membership::join(js, Config::new("alarm-loader", 32, lease, member_id)?).await?;
//! while let Some(lease) = m.next_lease().await {
//!     tokio::spawn(async move {
//!         // work on partition lease.partition() until lease.lost() fires;
//!         // every write of that work is a compare-and-set carrying lease.token().
//!         drop(lease); // tells the membership the work has stopped
//!     });
//! }
//! m.leave().await?; // release everything now: others take over at once
//! ```
//!
//! # How
//! - A member is the key `<group>.m.<member>`, written with a per-key TTL of one lease
//!   and written again every lease/3. The live members are the keys present.
//! - Partition `n` is the key `<group>.p.<n>`. Acquire: a write that expects the key's
//!   last revision to be a delete/expiry marker (or nothing), with TTL = lease; only
//!   one can succeed, and its revision is the lease's [`Token`]. Renew: a write that
//!   expects our last revision (refused: lost). Release: a delete marker that expects
//!   our last revision. A holder that dies stops renewing and the server expires the
//!   key one lease later, on its own clock, and places a marker every watcher sees.
//!   The bucket keeps one message a key (else nats-server raises every TTL to the
//!   markers' TTL), and members watch each key's newest message, then every change.
//! - Who should hold what is [`assign::assign`]: rendezvous hashing with exact quotas,
//!   a pure function of the live member ids and the partition count, so members agree
//!   without talking and a join or a leave moves about one share.
//! - A holder gives a partition up when the assignment says so: it tells its user
//!   ([`Lease::lost`]), waits until the user drops every clone of the [`Lease`] (bounded
//!   by one lease period, renewing meanwhile), then releases; the member the partition
//!   goes to acquires it the moment it sees the delete marker.
//! - A holder stops *before* the server would expire it: its own deadline is the send
//!   time of its last acknowledged renewal + lease − lease/5, on its monotonic clock.
//!   The server's expiry starts at the (later) store time and uses the TTL rounded up to
//!   whole seconds, so the old holder has stopped before a new one can acquire,
//!   unless its process was stalled past its deadline. Hence:
//!
//! # The contract: leases are for liveness, fencing is for safety
//! A lease makes it very likely that one member works on a partition, and makes a dead
//! member's work move within about one lease. It cannot by itself stop a holder that
//! was paused (GC, SIGSTOP, a slow disk) past its deadline and wakes up still
//! believing. So every write the user makes on behalf of a partition must be a
//! compare-and-set on the user's own records: e.g. a JetStream publish with
//! `Nats-Expected-Last-Subject-Sequence` set to the sequence the holder read, or a KV
//! `update` with the revision it read. A new holder's first act is such a write (it
//! reads the partition's state and writes over it, carrying its [`Token`]), so any
//! write the old holder prepared from an older read is refused by the server.
//! Tokens grow strictly from one holder to the next (they are revisions of one
//! stream), so a record may carry the token of the lease that wrote it and a holder
//! that reads a greater token than its own knows it is stale
//! ([`Token::is_superseded_by`]). [`Lease::is_current`] is a cheap local check to make
//! just before a write (it narrows the window; the compare-and-set closes it).
//!
//! # Layout
//! - [`assign`]: the desired assignment (pure).
//! - [`plan`]: what a member does next from what it has seen (pure).
//! - [`lease`]: [`Lease`] and [`Token`], what the user holds.
//! - [`keyed`]: leases on named keys taken on demand (exclusive locks with the same
//!   acquire/renew/release/expiry and tokens; the workers' execution keys).
//! - `member`: [`Membership`], the driver task that watches the bucket and writes it.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod assign;
pub mod keyed;
pub mod lease;
mod member;
pub mod plan;

use std::time::Duration;

pub use lease::{Lease, Token};
pub use member::{Held, Membership};

/// Everything that can go wrong joining or leaving a group.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work (what is wrong with it).
    #[error("ownership config: {0}")]
    Config(String),
    /// The bucket could not be created or opened.
    #[error("ownership bucket: {0}")]
    Bucket(#[source] journal::Error),
    /// The bucket exists, but not as ownership needs it: per-key TTL and delete markers
    /// (else leases never expire, or expire unseen) and one message a key (else the
    /// server raises every TTL to the markers' 15 minutes).
    #[error("bucket {0} exists without per-key TTL, delete markers or history 1 (allow_msg_ttl, subject_delete_marker_ttl, max_msgs_per_subject 1): leases in it would not expire in time; delete it")]
    BucketConfig(String),
    /// A JetStream call failed.
    #[error("jetstream {op}: {reason}")]
    JetStream {
        /// What was being done.
        op: &'static str,
        /// The server's or client's reason.
        reason: String,
    },
    /// The membership's task is gone (it failed, or the membership was dropped).
    #[error("the membership's task stopped")]
    Stopped,
    /// Leaving did not finish in time; what was not released expires on its own.
    #[error("leaving did not finish within {0:?}")]
    LeaveTimeout(Duration),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a member joins a group.
#[derive(Debug, Clone)]
pub struct Config {
    /// The group's name: one token of `A-Z a-z 0-9 - _`.
    pub group: String,
    /// The group's partition count. Fixed for the life of the group: every member must
    /// use the same (a member that sees another count logs a warning).
    pub partitions: u32,
    /// The lease: a dead member's partitions move after about this long. At least 1 s;
    /// the server's TTL is this rounded up to whole seconds.
    pub lease: Duration,
    /// This member's id: one token, unique to this process *incarnation* (e.g. host,
    /// pid and a random suffix). A restarted process must not reuse it: a member
    /// deletes keys in its own name that it does not hold.
    pub member: String,
    /// Names of the bucket (its prefix).
    pub subjects: journal::subjects::Subjects,
    /// Replicas of the bucket if this member creates it.
    pub replicas: usize,
}

impl Config {
    /// A config with the default prefix and one replica, checked.
    pub fn new(group: &str, partitions: u32, lease: Duration, member: &str) -> Result<Config> {
        let config = Config {
            group: group.to_string(),
            partitions,
            lease,
            member: member.to_string(),
            subjects: journal::subjects::Subjects::default(),
            replicas: 1,
        };
        config.check()?;
        Ok(config)
    }

    /// Refuses a config that cannot work.
    pub fn check(&self) -> Result<()> {
        use journal::subjects::is_ownership_token;
        if !is_ownership_token(&self.group) {
            return Err(Error::Config(format!(
                "group {:?}: one token of A-Z a-z 0-9 - _, ≤ 64 bytes",
                self.group
            )));
        }
        if !is_ownership_token(&self.member) {
            return Err(Error::Config(format!(
                "member {:?}: one token of A-Z a-z 0-9 - _, ≤ 64 bytes",
                self.member
            )));
        }
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(Error::Config(format!(
                "partitions {}: 1..={MAX_PARTITIONS}",
                self.partitions
            )));
        }
        if self.lease < Duration::from_secs(1) || self.lease > Duration::from_secs(3600) {
            return Err(Error::Config(format!(
                "lease {:?}: 1 s ..= 1 h (nats-server's per-message TTL counts whole seconds)",
                self.lease
            )));
        }
        Ok(())
    }
}

/// The most partitions a group may have (each is a key renewed every lease/3).
pub const MAX_PARTITIONS: u32 = 4096;
