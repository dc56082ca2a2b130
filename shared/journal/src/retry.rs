//! Retrying JetStream calls at startup. A fresh cluster answers "no stream found",
//! "JetStream system temporarily unavailable" or nothing at all until its meta leader
//! and then each new stream's leader are elected (ANCHORS.md); a misconfiguration
//! (permission denied, an existing stream that conflicts, no JetStream) answers the
//! same way however long one waits. [`Failure`] tells the two apart from the JetStream
//! error code or the client's error kind, [`Backoff`] spaces the attempts, and
//! [`Retry::run`] puts them together for any service's startup.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{MessagesError, MessagesErrorKind};
use async_nats::jetstream::context::{
    AccountError, AccountErrorKind, CreateKeyValueError, CreateKeyValueErrorKind,
    CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind, PublishError,
    PublishErrorKind, RequestError, RequestErrorKind,
};
use async_nats::jetstream::kv::{EntryError, EntryErrorKind, WatchError, WatchErrorKind};
use async_nats::jetstream::stream::{
    ConsumerError, ConsumerErrorKind, LastRawMessageError, LastRawMessageErrorKind,
};
use async_nats::jetstream::ErrorCode;

use crate::{Error, Result};

/// What kind of failure a NATS call had, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The JetStream API answered with an error: its status (HTTP-like) and its
    /// JetStream error code.
    Api {
        /// 400, 404, 500, 503, ...
        status: u64,
        /// The JetStream error code (10008, 10058, ...).
        code: u64,
    },
    /// Nobody answered: JetStream, or the leader of the stream written to, is not
    /// there (yet). A publish's "no stream found for given subject" is this.
    NoResponders,
    /// No answer in time.
    TimedOut,
    /// The connection failed under the call.
    Connection,
    /// The server refused the call for lack of permission (it says so on the
    /// connection, not in an answer: see [`Denials`]).
    PermissionDenied,
    /// Anything else (a name the client refuses, an answer that does not parse, ...).
    Other,
}

/// JetStream error codes that a cluster which is forming, electing or moving answers
/// for a while, and stops answering by itself.
const TRANSIENT_CODES: [ErrorCode; 11] = [
    ErrorCode::CLUSTER_INCOMPLETE,
    ErrorCode::CLUSTER_NO_PEERS,
    ErrorCode::CLUSTER_NOT_ACTIVE,
    ErrorCode::CLUSTER_NOT_ASSIGNED,
    ErrorCode::CLUSTER_NOT_AVAILABLE,
    ErrorCode::CLUSTER_NOT_LEADER,
    ErrorCode::INSUFFICIENT_RESOURCES,
    // A stream or bucket this startup has just created, asked of a node that has not
    // applied its assignment yet.
    ErrorCode::STREAM_NOT_FOUND,
    ErrorCode::STREAM_TOO_MANY_REQUESTS,
    ErrorCode::CLUSTER_SERVER_MEMBER_CHANGE_INFLIGHT,
    ErrorCode::PEER_REMAP,
];

impl Failure {
    /// The failure that `error` (any async-nats error, or a chain of errors holding one)
    /// reports: read from the first error kind or JetStream error code in its chain that
    /// says something.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Failure {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(found) = Failure::of_one(e) {
                return found;
            }
            next = e.source();
        }
        Failure::Other
    }

    /// What this one error says, if it says something (`None`: look at its source).
    fn of_one(e: &(dyn std::error::Error + 'static)) -> Option<Failure> {
        use Failure::*;
        if let Some(e) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(Failure::api(e));
        }
        if let Some(e) = e.downcast_ref::<CreateStreamError>() {
            return match e.kind() {
                CreateStreamErrorKind::JetStream(api) => Some(Failure::api(&api)),
                CreateStreamErrorKind::JetStreamUnavailable => Some(NoResponders),
                CreateStreamErrorKind::TimedOut => Some(TimedOut),
                CreateStreamErrorKind::Response => None,
                _ => Some(Other),
            };
        }
        if let Some(e) = e.downcast_ref::<GetStreamError>() {
            return match e.kind() {
                GetStreamErrorKind::JetStream(api) => Some(Failure::api(&api)),
                GetStreamErrorKind::Request => None,
                _ => Some(Other),
            };
        }
        if let Some(e) = e.downcast_ref::<LastRawMessageError>() {
            return match e.kind() {
                LastRawMessageErrorKind::JetStream(api) => Some(Failure::api(&api)),
                LastRawMessageErrorKind::Other => None,
                _ => Some(Other),
            };
        }
        if let Some(e) = e.downcast_ref::<AccountError>() {
            return match e.kind() {
                AccountErrorKind::JetStream(api) => Some(Failure::api(&api)),
                AccountErrorKind::JetStreamUnavailable => Some(NoResponders),
                AccountErrorKind::TimedOut => Some(TimedOut),
                AccountErrorKind::Other => None,
            };
        }
        if let Some(e) = e.downcast_ref::<ConsumerError>() {
            return match e.kind() {
                ConsumerErrorKind::JetStream(api) => Some(Failure::api(&api)),
                ConsumerErrorKind::TimedOut => Some(TimedOut),
                _ => None,
            };
        }
        if let Some(e) = e.downcast_ref::<MessagesError>() {
            // A pull nobody answered (the consumer's server not ready yet, e.g. right
            // after a cluster restart) or whose heartbeats stopped.
            return match e.kind() {
                MessagesErrorKind::NoResponders => Some(NoResponders),
                MessagesErrorKind::MissingHeartbeat => Some(TimedOut),
                _ => None,
            };
        }
        if let Some(e) = e.downcast_ref::<RequestError>() {
            return match e.kind() {
                RequestErrorKind::NoResponders => Some(NoResponders),
                RequestErrorKind::TimedOut => Some(TimedOut),
                RequestErrorKind::InvalidSubject => Some(Other),
                RequestErrorKind::Other => None,
            };
        }
        if let Some(e) = e.downcast_ref::<async_nats::RequestError>() {
            return match e.kind() {
                async_nats::RequestErrorKind::NoResponders => Some(NoResponders),
                async_nats::RequestErrorKind::TimedOut => Some(TimedOut),
                async_nats::RequestErrorKind::Other => Some(Connection),
                _ => Some(Other),
            };
        }
        if let Some(e) = e.downcast_ref::<PublishError>() {
            return match e.kind() {
                PublishErrorKind::StreamNotFound => Some(NoResponders),
                PublishErrorKind::TimedOut => Some(TimedOut),
                PublishErrorKind::BrokenPipe => Some(Connection),
                // Too many publishes waiting for their acks: they drain by themselves.
                PublishErrorKind::MaxAckPending => Some(TimedOut),
                PublishErrorKind::Other => None,
                _ => Some(Other),
            };
        }
        if let Some(e) = e.downcast_ref::<CreateKeyValueError>() {
            return match e.kind() {
                CreateKeyValueErrorKind::TimedOut => Some(TimedOut),
                CreateKeyValueErrorKind::JetStream | CreateKeyValueErrorKind::BucketCreate => None,
                _ => Some(Other),
            };
        }
        if let Some(e) = e.downcast_ref::<EntryError>() {
            return (e.kind() == EntryErrorKind::TimedOut).then_some(TimedOut);
        }
        if let Some(e) = e.downcast_ref::<WatchError>() {
            return (e.kind() == WatchErrorKind::TimedOut).then_some(TimedOut);
        }
        if e.downcast_ref::<std::io::Error>().is_some() {
            return Some(Connection);
        }
        None
    }

    fn api(e: &async_nats::jetstream::Error) -> Failure {
        Failure::Api {
            status: e.code() as u64,
            code: e.error_code().0,
        }
    }

    /// Whether waiting may cure it: a cluster still electing leaders, a server not up
    /// yet, a lost connection. A misconfiguration (no permission, a conflicting stream,
    /// no JetStream, an unknown answer) is not: retrying it only delays the message.
    pub fn is_transient(self) -> bool {
        match self {
            Failure::NoResponders | Failure::TimedOut | Failure::Connection => true,
            Failure::PermissionDenied | Failure::Other => false,
            Failure::Api { status, code } => {
                if TRANSIENT_CODES.contains(&ErrorCode(code)) {
                    return true;
                }
                // Codes this table does not know: what the status says.
                !is_known_permanent(code) && matches!(status, 408 | 429 | 503 | 504)
            }
        }
    }

    /// Whether the JetStream API said the stream (or bucket) does not exist.
    pub fn is_not_found(self) -> bool {
        matches!(self, Failure::Api { status, code }
            if status == 404 || code == ErrorCode::STREAM_NOT_FOUND.0)
    }
}

/// Codes that are a misconfiguration whatever status they come with.
fn is_known_permanent(code: u64) -> bool {
    [
        ErrorCode::JETSTREAM_NOT_ENABLED,
        ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
        ErrorCode::STREAM_NAME_EXIST,
        ErrorCode::STREAM_SUBJECT_OVERLAP,
        ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED,
        ErrorCode::STREAM_REPLICAS_NOT_UPDATABLE,
        ErrorCode::REQUIRED_API_LEVEL,
        ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
    ]
    .contains(&ErrorCode(code))
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Api { status, code } => write!(f, "JetStream error {code} (status {status})"),
            Failure::NoResponders => f.write_str("no responders"),
            Failure::TimedOut => f.write_str("timed out"),
            Failure::Connection => f.write_str("connection failed"),
            Failure::PermissionDenied => f.write_str("permission denied"),
            Failure::Other => f.write_str("failed"),
        }
    }
}

/// How long to wait between attempts: `first`, doubling up to `max`, and no attempt
/// started after `total` since the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
    /// The time after which a transient failure is given up on.
    pub total: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling to 5 s, for up to 60 s: a cluster elects a leader within the
    /// RAFT election timeout (4-9 s, ANCHORS.md), a node restarts in seconds.
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_secs(5),
            total: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The wait after failed attempt number `attempt` (1 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.first
            .checked_mul(1u32 << doublings)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The next wait after failed attempt `attempt`, `elapsed` after the first attempt
    /// began: `None` when the attempt after it would start past `total`.
    pub fn next(&self, attempt: u32, elapsed: Duration) -> Option<Duration> {
        let delay = self.delay(attempt);
        (elapsed + delay <= self.total).then_some(delay)
    }
}

/// Tells whether the server refused something for lack of permission: it says so on
/// the connection (`-ERR 'Permissions Violation ...'`), while the request itself only
/// times out. Implemented by whatever watches the connection's events (the service
/// crate's `ConnectionEvents`).
pub trait Denials: Send + Sync {
    /// How many permission violations the connection has reported so far, and the last.
    fn permission_denials(&self) -> (u64, String);
}

/// Runs startup steps again while they fail transiently (see [`Failure`]), with
/// [`Backoff`] between attempts, logging each retry.
#[derive(Clone, Default)]
pub struct Retry {
    backoff: Backoff,
    denials: Option<Arc<dyn Denials>>,
}

impl std::fmt::Debug for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl Retry {
    /// Retries with `backoff`.
    pub fn new(backoff: Backoff) -> Retry {
        Retry {
            backoff,
            denials: None,
        }
    }

    /// Also ends at once, as permission denied, an attempt during which the connection
    /// reported a permission violation.
    pub fn watching(mut self, denials: Arc<dyn Denials>) -> Retry {
        self.denials = Some(denials);
        self
    }

    /// Runs `attempt` until it succeeds, fails for good (returned as it is), or has
    /// failed transiently past the backoff's `total` ([`Error::GaveUp`]). `what` names
    /// the step in the log and in the error.
    pub async fn run<T, F, Fut>(&self, what: &'static str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let started = tokio::time::Instant::now();
        let mut n: u32 = 0;
        loop {
            n += 1;
            let denied_before = self.denials.as_ref().map(|d| d.permission_denials().0);
            let error = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if let (Some(d), Some(before)) = (&self.denials, denied_before) {
                let (now, last) = d.permission_denials();
                if now > before {
                    return Err(Error::Nats {
                        op: what,
                        failure: Failure::PermissionDenied,
                        reason: last,
                    });
                }
            }
            if !error.is_transient() {
                return Err(error);
            }
            let elapsed = started.elapsed();
            let Some(delay) = self.backoff.next(n, elapsed) else {
                return Err(Error::GaveUp {
                    what,
                    attempts: n,
                    elapsed,
                    last: Box::new(error),
                });
            };
            tracing::warn!(what, attempt = n, error = %error, retry_in = ?delay, "startup step failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn api(status: u64, code: u64) -> async_nats::jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": status, "err_code": code, "description": "test"
        }))
        .unwrap()
    }

    #[test]
    fn failures_are_read_from_kinds_and_codes_down_the_chain() {
        let check = |e: &(dyn std::error::Error + 'static), want: Failure| {
            assert_eq!(Failure::of(e), want, "{e}");
        };
        // The error of a KV put on a bucket whose leader is not elected yet.
        let put = async_nats::jetstream::kv::PutError::with_source(
            async_nats::jetstream::kv::PutErrorKind::Ack,
            PublishError::new(PublishErrorKind::StreamNotFound),
        );
        check(&put, Failure::NoResponders);
        let unavailable = api(503, 10008);
        check(
            &CreateStreamError::new(CreateStreamErrorKind::JetStream(unavailable.clone())),
            Failure::Api {
                status: 503,
                code: 10008,
            },
        );
        // get_key_value → get_stream → the API's answer.
        let kv = async_nats::jetstream::context::KeyValueError::with_source(
            async_nats::jetstream::context::KeyValueErrorKind::GetBucket,
            GetStreamError::new(GetStreamErrorKind::JetStream(api(404, 10059))),
        );
        check(
            &kv,
            Failure::Api {
                status: 404,
                code: 10059,
            },
        );
        // stream.info(): a request error with the API's answer as its source.
        check(
            &RequestError::with_source(RequestErrorKind::Other, unavailable),
            Failure::Api {
                status: 503,
                code: 10008,
            },
        );
        check(
            &CreateKeyValueError::with_source(
                CreateKeyValueErrorKind::JetStream,
                AccountError::new(AccountErrorKind::JetStreamUnavailable),
            ),
            Failure::NoResponders,
        );
        check(
            &RequestError::new(RequestErrorKind::TimedOut),
            Failure::TimedOut,
        );
        check(
            &PublishError::new(PublishErrorKind::BrokenPipe),
            Failure::Connection,
        );
        // A stream message read (the firing key) on a stream not applied yet.
        check(
            &LastRawMessageError::new(LastRawMessageErrorKind::JetStream(api(404, 10059))),
            Failure::Api {
                status: 404,
                code: 10059,
            },
        );
        check(
            &LastRawMessageError::new(LastRawMessageErrorKind::InvalidSubject),
            Failure::Other,
        );
        check(&std::fmt::Error, Failure::Other);
    }

    #[test]
    fn a_forming_cluster_is_transient_a_misconfiguration_is_not() {
        let api = |status, code| Failure::Api { status, code };
        for (failure, transient) in [
            (Failure::NoResponders, true),
            (Failure::TimedOut, true),
            (Failure::Connection, true),
            (api(503, 10008), true), // JetStream system temporarily unavailable
            (api(500, 10009), true), // not leader
            (api(503, 10023), true), // insufficient resources (peers still joining)
            (api(400, 10005), true), // no suitable peers for placement (yet)
            (api(404, 10059), true), // a just-created stream not applied yet
            (api(503, 99999), true), // unknown, but the server says "unavailable"
            (Failure::PermissionDenied, false),
            (Failure::Other, false),
            (api(503, 10076), false), // JetStream not enabled
            (api(503, 10039), false), // JetStream not enabled for the account
            (api(400, 10058), false), // stream name in use with another configuration
            (api(400, 10065), false), // subjects overlap with an existing stream
            (api(500, 10074), false), // replicas > 1 on a server without a cluster
            (api(400, 10003), false), // bad request
            (api(400, 99999), false), // unknown, and the server says "bad request"
        ] {
            assert_eq!(failure.is_transient(), transient, "{failure}");
        }
        assert!(api(404, 10059).is_not_found());
        assert!(!api(503, 10008).is_not_found());
    }

    #[test]
    fn a_pull_nobody_answered_is_transient_wherever_it_is_wrapped() {
        let unanswered = MessagesError::new(MessagesErrorKind::NoResponders);
        assert_eq!(Failure::of(&unanswered), Failure::NoResponders);
        assert!(Error::nats("read the log", &unanswered).is_transient());
        let silent = MessagesError::new(MessagesErrorKind::MissingHeartbeat);
        assert_eq!(Failure::of(&silent), Failure::TimedOut);
        let push = MessagesError::new(MessagesErrorKind::PushBasedConsumer);
        assert!(!Error::nats("read the log", &push).is_transient());
    }

    #[test]
    fn the_backoff_doubles_to_its_cap_and_stops_at_its_total() {
        let b = Backoff::default();
        let delays: Vec<u64> = (1..=9).map(|n| b.delay(n).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(b.delay(u32::MAX), b.max);
        // Were every attempt instant, the schedule would be these waits.
        let mut elapsed = Duration::ZERO;
        let mut schedule = Vec::new();
        while let Some(d) = b.next(schedule.len() as u32 + 1, elapsed) {
            elapsed += d;
            schedule.push(d);
        }
        assert!(elapsed <= b.total);
        assert!(elapsed + b.max > b.total, "stopped early at {elapsed:?}");
        // 6.3 s for the doubling part, then 5 s steps up to 60 s: 6 + 10 waits.
        assert_eq!(schedule.len(), 16);
    }

    fn transient() -> Error {
        Error::Nats {
            op: "test",
            failure: Failure::NoResponders,
            reason: "no responders".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_waits_out_transient_failures_and_returns_permanent_ones_at_once() {
        let retry = Retry::new(Backoff::default());
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let v = retry
            .run("flaky", || async {
                if calls.fetch_add(1, Ordering::Relaxed) < 3 {
                    Err(transient())
                } else {
                    Ok(7)
                }
            })
            .await
            .unwrap();
        assert_eq!((v, calls.load(Ordering::Relaxed)), (7, 4));
        assert_eq!(started.elapsed(), Duration::from_millis(100 + 200 + 400));

        calls.store(0, Ordering::Relaxed);
        let e = retry
            .run("refused", || async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err::<(), _>(Error::NoJetStream)
            })
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoJetStream));
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        let e = retry
            .run("never", || async { Err::<(), _>(transient()) })
            .await
            .unwrap_err();
        let Error::GaveUp {
            what,
            attempts,
            elapsed,
            ..
        } = e
        else {
            panic!("not given up: {e}");
        };
        assert_eq!((what, attempts), ("never", 17));
        assert!(elapsed <= Backoff::default().total);
    }

    /// A connection's permission violations, as the server reports them.
    struct Violations(AtomicU32);

    impl Denials for Violations {
        fn permission_denials(&self) -> (u64, String) {
            let n = self.0.load(Ordering::Relaxed);
            (u64::from(n), "permissions violation for publish".into())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_permission_violation_during_an_attempt_ends_the_retries() {
        // One violation from before the step must not count against it.
        let violations = Arc::new(Violations(AtomicU32::new(1)));
        let retry = Retry::new(Backoff::default()).watching(violations.clone());
        let calls = AtomicU32::new(0);
        let e = retry
            .run("create", || async {
                // The second attempt's request is refused: the server says so on the
                // connection, the request times out.
                if calls.fetch_add(1, Ordering::Relaxed) == 1 {
                    violations.0.fetch_add(1, Ordering::Relaxed);
                }
                Err::<(), _>(Error::Nats {
                    op: "create",
                    failure: Failure::TimedOut,
                    reason: "timed out".into(),
                })
            })
            .await
            .unwrap_err();
        assert!(matches!(
            e,
            Error::Nats {
                failure: Failure::PermissionDenied,
                ..
            }
        ));
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }
}
