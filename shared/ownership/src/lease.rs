//! What the user holds: a [`Lease`] on one partition, with its fencing [`Token`].

use std::fmt;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// A lease's fencing token: the revision (stream sequence of the ownership bucket) of
/// the write that acquired it. It stays the same while the lease is renewed, and every
/// later holder of the partition has a greater one. Carry it in the records written
/// under the lease (see the crate docs: the user's compare-and-set is what makes a
/// stale holder's write fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u64);

impl Token {
    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// Whether a record written under `other` proves this lease stale: a later holder
    /// of the partition wrote it.
    pub fn is_superseded_by(self, other: Token) -> bool {
        other > self
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A held partition. Clone it into the tasks that work on the partition; the
/// membership knows the work has stopped when every clone is dropped, and only then
/// releases the partition to its next holder (or after one lease period at most).
#[derive(Debug, Clone)]
pub struct Lease {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    partition: u32,
    token: Token,
    lost: CancellationToken,
    deadline: watch::Receiver<Instant>,
    /// Dropped with the last clone: tells the membership the work stopped.
    _stopped: oneshot::Sender<()>,
}

impl Lease {
    pub(crate) fn new(
        partition: u32,
        token: Token,
        lost: CancellationToken,
        deadline: watch::Receiver<Instant>,
        stopped: oneshot::Sender<()>,
    ) -> Lease {
        Lease {
            inner: Arc::new(Inner {
                partition,
                token,
                lost,
                deadline,
                _stopped: stopped,
            }),
        }
    }

    /// The partition.
    pub fn partition(&self) -> u32 {
        self.inner.partition
    }

    /// The fencing token.
    pub fn token(&self) -> Token {
        self.inner.token
    }

    /// Whether the lease still holds as far as this member knows: not given up, not
    /// lost, and before its local deadline. A cheap check before a write; it cannot
    /// replace the write's own compare-and-set.
    pub fn is_current(&self) -> bool {
        !self.inner.lost.is_cancelled() && Instant::now() < *self.inner.deadline.borrow()
    }

    /// The local deadline: the lease is considered lost from then on unless renewed
    /// (it moves with each renewal).
    pub fn deadline(&self) -> Instant {
        *self.inner.deadline.borrow()
    }

    /// Completes when the work must stop: the lease was lost, reached its local
    /// deadline, or is being handed over (rebalance, leave, the membership dropped).
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.inner.lost.cancelled()
    }

    /// A token cancelled when [`Lease::lost`] completes, for `select!` or to hand to
    /// other tasks (a child: cancelling it does not touch the lease).
    pub fn cancellation(&self) -> CancellationToken {
        self.inner.lost.child_token()
    }
}
