//! Cluster-wide ownership (`shared/ownership`) against a real nats-server: splitting,
//! rebalancing without overlap, crashes, stalls and restarts.
//!
//! Two records are checked in every test. The *tenures*: each member's user task
//! receives every lease, records when it started and when `lost()` fired, and only
//! then drops it (which is what lets the membership release it), so for one partition
//! the tenures of different members must never overlap on the test's one clock. The
//! *bucket*: a watcher reads every write of every partition key in stream order; an
//! acquiring write must follow a delete or an expiry marker (or nothing), a renewal
//! must follow its own lease's write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use ::ownership::{assign, Config, Lease, Membership, Token};
use harness::NatsServer;
use journal::subjects::Subjects;

use crate::support::{connect_as, server, Role};

const GROUP: &str = "test-group";
const LEASE: Duration = Duration::from_secs(3);

/// One lease as the user saw it.
#[derive(Debug, Clone)]
struct Tenure {
    member: String,
    partition: u32,
    token: Token,
    start: Instant,
    end: Option<Instant>,
}

#[derive(Default)]
struct Tenures(Mutex<Vec<Tenure>>);

impl Tenures {
    fn start(&self, member: &str, lease: &Lease) -> usize {
        let mut all = self.0.lock().unwrap();
        all.push(Tenure {
            member: member.to_string(),
            partition: lease.partition(),
            token: lease.token(),
            start: Instant::now(),
            end: None,
        });
        all.len() - 1
    }

    fn end(&self, i: usize) {
        self.0.lock().unwrap()[i].end = Some(Instant::now());
    }

    fn all(&self) -> Vec<Tenure> {
        self.0.lock().unwrap().clone()
    }

    /// The partitions whose lease `member`'s user task has received and not seen lost.
    fn open(&self, member: &str) -> BTreeSet<u32> {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter(|t| t.member == member && t.end.is_none())
            .map(|t| t.partition)
            .collect()
    }

    /// For each partition, no two tenures overlap, and tokens grow from one to the next.
    fn assert_exclusive(&self) {
        let mut by_partition: BTreeMap<u32, Vec<Tenure>> = BTreeMap::new();
        for t in self.all() {
            by_partition.entry(t.partition).or_default().push(t);
        }
        for (p, mut ts) in by_partition {
            ts.sort_by_key(|t| t.start);
            for pair in ts.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                let a_end = a.end.unwrap_or_else(|| {
                    panic!("partition {p}: {a:?} never ended but {b:?} started")
                });
                assert!(
                    a_end <= b.start,
                    "partition {p}: {} held it until {:?} after {} took it",
                    a.member,
                    a_end - b.start,
                    b.member
                );
                assert!(a.token < b.token, "partition {p}: tokens {a:?} then {b:?}");
            }
        }
    }

    /// The gaps between one tenure's end and the next one's start (handover times).
    fn gaps(&self) -> Vec<Duration> {
        let mut by_partition: BTreeMap<u32, Vec<Tenure>> = BTreeMap::new();
        for t in self.all() {
            by_partition.entry(t.partition).or_default().push(t);
        }
        let mut gaps = Vec::new();
        for ts in by_partition.values_mut() {
            ts.sort_by_key(|t| t.start);
            for pair in ts.windows(2) {
                if let Some(end) = pair[0].end {
                    gaps.push(pair[1].start.saturating_duration_since(end));
                }
            }
        }
        gaps.sort();
        gaps
    }
}

/// A member under test: its membership, and a user task that records every lease.
struct Member {
    name: String,
    membership: Membership,
    user: JoinHandle<()>,
    tenures: Arc<Tenures>,
}

impl Member {
    async fn join(
        server: &NatsServer,
        name: &str,
        partitions: u32,
        tenures: &Arc<Tenures>,
    ) -> Result<Member> {
        let js = jetstream::new(connect_as(server, Role::Scheduler).await?);
        let config = Config::new(GROUP, partitions, LEASE, name)?;
        let mut membership = Membership::join(js, config).await?;
        let mut leases = membership.leases().context("leases taken")?;
        let recorded = Arc::clone(tenures);
        let (tenures, member) = (Arc::clone(tenures), name.to_string());
        let user = tokio::spawn(async move {
            while let Some(lease) = leases.recv().await {
                let i = tenures.start(&member, &lease);
                let tenures = Arc::clone(&tenures);
                tokio::spawn(async move {
                    lease.lost().await;
                    tenures.end(i);
                    drop(lease);
                });
            }
        });
        Ok(Member {
            name: name.to_string(),
            membership,
            user,
            tenures: recorded,
        })
    }

    fn held(&self) -> BTreeSet<u32> {
        self.membership.held().borrow().keys().copied().collect()
    }

    /// A crash: the membership and its user task end without releasing anything.
    fn crash(self) {
        self.user.abort();
        drop(self.membership);
    }
}

/// Waits until the members hold exactly `loads` partitions each (in order), disjoint
/// and covering `0..partitions`, and each member's user task has recorded the start of
/// every lease it holds (`held()` is the membership's view and runs ahead of the user
/// task: CI once counted 10 tenures taken after a leave while the members already held
/// 11 more); returns how long it took. Fails after `bound`.
async fn wait_balanced(
    members: &[&Member],
    partitions: u32,
    loads: &[usize],
    bound: Duration,
) -> Result<Duration> {
    let began = Instant::now();
    loop {
        let held: Vec<BTreeSet<u32>> = members.iter().map(|m| m.held()).collect();
        let union: BTreeSet<u32> = held.iter().flatten().copied().collect();
        let total: usize = held.iter().map(BTreeSet::len).sum();
        let got: Vec<usize> = held.iter().map(BTreeSet::len).collect();
        let recorded = members
            .iter()
            .zip(&held)
            .all(|(m, h)| m.tenures.open(&m.name) == *h);
        if got == loads && total == union.len() && union.len() == partitions as usize && recorded {
            return Ok(began.elapsed());
        }
        if began.elapsed() > bound {
            let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
            let open: Vec<BTreeSet<u32>> =
                members.iter().map(|m| m.tenures.open(&m.name)).collect();
            bail!("not balanced as {loads:?} within {bound:?}: {names:?} hold {held:?}, their user tasks recorded {open:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How the key was free before an acquiring write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FreedBy {
    /// Never written.
    Nothing,
    /// Released by its holder (a delete marker).
    Release,
    /// Expired on the server (its expiry marker).
    Expiry,
}

/// Every write of the group's partition keys, in stream order, from before anyone joined.
struct BucketAudit {
    entries: Arc<Mutex<Vec<kv::Entry>>>,
    task: JoinHandle<()>,
}

impl BucketAudit {
    async fn start(server: &NatsServer) -> Result<BucketAudit> {
        let js = jetstream::new(connect_as(server, Role::Operator).await?);
        let store = journal::setup::ensure_ownership(
            &js,
            &Subjects::default(),
            &journal::setup::LogOptions::default(),
        )
        .await?;
        let mut watch = store.watch_from_revision(format!("{GROUP}.p.>"), 1).await?;
        let entries = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&entries);
        let task = tokio::spawn(async move {
            let _keep = js;
            while let Some(Ok(entry)) = watch.next().await {
                sink.lock().unwrap().push(entry);
            }
        });
        Ok(BucketAudit { entries, task })
    }

    /// `check()` once it reports at least `acquisitions` acquisitions, or after `bound`
    /// whatever it reports (the caller's assertions then say what is missing).
    async fn caught_up(&self, acquisitions: usize, bound: Duration) -> Vec<(u32, String, FreedBy)> {
        let began = Instant::now();
        loop {
            let seen = self.check();
            if seen.len() >= acquisitions || began.elapsed() > bound {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Checks every key's history; returns, for each acquisition (partition, holder),
    /// how the key had been freed.
    fn check(&self) -> Vec<(u32, String, FreedBy)> {
        let entries = self.entries.lock().unwrap().clone();
        let mut state: BTreeMap<String, Option<(String, u64)>> = BTreeMap::new();
        let mut freed: BTreeMap<String, FreedBy> = BTreeMap::new();
        let mut acquisitions = Vec::new();
        let mut last_revision = 0;
        for e in entries {
            assert!(e.revision > last_revision, "out of order: {e:?}");
            last_revision = e.revision;
            let current = state.entry(e.key.clone()).or_default();
            match e.operation {
                kv::Operation::Put => {
                    let v: serde_json::Value = serde_json::from_slice(&e.value).unwrap();
                    let holder = v["holder"].as_str().unwrap().to_string();
                    match v["token"].as_u64() {
                        None => {
                            assert!(
                                current.is_none(),
                                "{}: {holder} acquired at {} while {current:?} held it",
                                e.key,
                                e.revision
                            );
                            let p = e.key.rsplit('.').next().unwrap().parse().unwrap();
                            let how = freed.get(&e.key).copied().unwrap_or(FreedBy::Nothing);
                            acquisitions.push((p, holder.clone(), how));
                            *current = Some((holder, e.revision));
                        }
                        Some(token) => assert_eq!(
                            current.as_ref(),
                            Some(&(holder.clone(), token)),
                            "{}: renewal by {holder} of token {token} at {} of another lease",
                            e.key,
                            e.revision
                        ),
                    }
                }
                kv::Operation::Delete => {
                    *current = None;
                    freed.insert(e.key.clone(), FreedBy::Release);
                }
                kv::Operation::Purge => {
                    *current = None;
                    freed.insert(e.key.clone(), FreedBy::Expiry);
                }
            }
        }
        acquisitions
    }
}

impl Drop for BucketAudit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn summary(gaps: &[Duration]) -> String {
    match (gaps.first(), gaps.get(gaps.len() / 2), gaps.last()) {
        (Some(min), Some(p50), Some(max)) => {
            format!(
                "{} handovers: min {min:?}, median {p50:?}, max {max:?}",
                gaps.len()
            )
        }
        _ => "no handovers".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_partitions_evenly_and_hand_over_without_overlap() -> Result<()> {
    let server = server()?;
    let audit = BucketAudit::start(&server).await?;
    let tenures = Arc::new(Tenures::default());
    let bound = LEASE * 5;

    let a = Member::join(&server, "a", 32, &tenures).await?;
    wait_balanced(&[&a], 32, &[32], bound).await?;
    let b = Member::join(&server, "b", 32, &tenures).await?;
    let took = wait_balanced(&[&a, &b], 32, &[16, 16], bound).await?;
    eprintln!("second member: balanced 16/16 after {took:?}");

    let c = Member::join(&server, "c", 32, &tenures).await?;
    let loads3: Vec<usize> = ["a", "b", "c"]
        .iter()
        .map(|m| assign::share(GROUP, ["a", "b", "c"], 32, m).len())
        .collect();
    let took = wait_balanced(&[&a, &b, &c], 32, &loads3, bound).await?;
    eprintln!("third member: balanced {loads3:?} after {took:?}");
    eprintln!("{}", summary(&tenures.gaps()));

    // A graceful leave hands over at once: every partition of b is taken by a or c
    // after b's release, not after an expiry.
    let before_leave = tenures.all().len();
    let b_had = b.held().len();
    let left = Instant::now();
    b.membership.leave().await?;
    let loads: Vec<usize> = ["a", "c"]
        .iter()
        .map(|m| assign::share(GROUP, ["a", "c"], 32, m).len())
        .collect();
    let took = wait_balanced(&[&a, &c], 32, &loads, bound).await?;
    eprintln!(
        "leave: b released in {:?}, a and c balanced after {took:?} in all",
        left.elapsed()
    );
    let retaken = tenures.all().len() - before_leave;
    assert!(
        retaken >= b_had,
        "{retaken} leases taken after b left, b had {b_had}"
    );

    tenures.assert_exclusive();
    // The audit watches the bucket on its own connection and may lag behind the
    // members (seen in CI on 2 busy cores): wait, bounded, until it has seen every
    // tenure the members recorded, then compare.
    let acquisitions = audit.caught_up(tenures.all().len(), LEASE * 3).await;
    assert!(
        acquisitions.len() >= 32 + 16 + loads3[2] + b_had,
        "{} acquisitions in the bucket",
        acquisitions.len()
    );
    assert_eq!(acquisitions.len(), tenures.all().len());
    for (p, holder, how) in &acquisitions {
        assert_ne!(
            *how,
            FreedBy::Expiry,
            "partition {p} went to {holder} only after it expired: a handover was not clean"
        );
    }
    a.membership.leave().await?;
    c.membership.leave().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_member_loses_its_partitions_to_the_others_after_a_lease() -> Result<()> {
    let server = server()?;
    let audit = BucketAudit::start(&server).await?;
    let tenures = Arc::new(Tenures::default());
    let bound = LEASE * 5;
    let a = Member::join(&server, "a", 32, &tenures).await?;
    wait_balanced(&[&a], 32, &[32], bound).await?;
    let b = Member::join(&server, "b", 32, &tenures).await?;
    wait_balanced(&[&a, &b], 32, &[16, 16], bound).await?;
    let b_had = b.held();

    b.crash();
    let took = wait_balanced(&[&a], 32, &[32], LEASE * 4).await?;
    eprintln!("crash: the survivor holds all 32 {took:?} after the crash (lease {LEASE:?})");

    tenures.assert_exclusive();
    // b's partitions went to a when the server expired them, never earlier. The audit
    // watches the bucket on its own connection and may lag behind: wait (bounded) until
    // it has seen a take every partition of b.
    let mut after: Vec<_> = Vec::new();
    for _ in 0..100 {
        after = audit
            .check()
            .into_iter()
            .filter(|(p, holder, _)| holder == "a" && b_had.contains(p))
            .collect();
        let seen: BTreeSet<u32> = after.iter().map(|(p, _, _)| *p).collect();
        if seen == b_had {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retaken: BTreeSet<u32> = after
        .iter()
        .filter(|(_, _, how)| *how == FreedBy::Expiry)
        .map(|(p, _, _)| *p)
        .collect();
    assert_eq!(
        retaken, b_had,
        "every partition of b taken after its expiry"
    );
    a.membership.leave().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_renew_learns_it_lost_and_its_token_is_fenced_off() -> Result<()> {
    let server = server()?;
    let js = jetstream::new(connect_as(&server, Role::Scheduler).await?);
    let mut membership = Membership::join(js, Config::new(GROUP, 2, LEASE, "a")?).await?;
    let first = tokio::time::timeout(LEASE * 3, membership.next_lease())
        .await?
        .context("no lease")?;
    let partition = first.partition();
    let old = first.token();

    // The user's own record of the partition, written under the lease with a
    // compare-and-set (as the operator: any bucket of the user's would do).
    let user = jetstream::new(connect_as(&server, Role::Operator).await?);
    let records = user
        .create_key_value(kv::Config {
            bucket: "USER_RECORDS".into(),
            history: 5,
            ..Default::default()
        })
        .await?;
    let key = format!("partition-{partition}");
    let read_at = records
        .create(&key, old.to_string().into())
        .await
        .context("first write under the lease")?;

    // The server stalls for longer than a lease: nothing can be renewed.
    let pid = server.pid().context("server pid")?;
    harness::send_signal(pid, "STOP")?;
    let stalled = Instant::now();
    let lost_in = tokio::time::timeout(LEASE * 2, first.lost()).await;
    let noticed = stalled.elapsed();
    tokio::time::sleep((LEASE + Duration::from_secs(2)).saturating_sub(noticed)).await;
    harness::send_signal(pid, "CONT")?;
    assert!(
        lost_in.is_ok(),
        "the lease was not given up while the server was stalled"
    );
    assert!(!first.is_current());
    eprintln!("stall: lease given up {noticed:?} after the server stopped (lease {LEASE:?})");
    drop(first);

    // Once the server runs again the partition is taken anew, with a greater token.
    let again = loop {
        let lease = tokio::time::timeout(LEASE * 4, membership.next_lease())
            .await?
            .context("no lease after the stall")?;
        if lease.partition() == partition {
            break lease;
        }
    };
    let new = again.token();
    assert!(new > old && old.is_superseded_by(new), "{old} then {new}");
    // The new holder's first act: its own compare-and-set over what it read.
    records
        .update(&key, new.to_string().into(), read_at)
        .await
        .context("the new holder's fencing write")?;
    // The stale holder's write, prepared from its old read, is refused by the server.
    let stale = records
        .update(&key, format!("stale {old}").into(), read_at)
        .await;
    match stale {
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
        other => panic!("the stale holder's write was not refused: {other:?}"),
    }
    let stored = records.get(&key).await?.context("record")?;
    assert_eq!(stored, new.to_string().as_bytes());
    drop(again);
    membership.leave().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_keeps_working_across_a_server_restart() -> Result<()> {
    let mut server = server()?;
    let tenures = Arc::new(Tenures::default());
    let bound = LEASE * 5;
    let a = Member::join(&server, "a", 32, &tenures).await?;
    wait_balanced(&[&a], 32, &[32], bound).await?;
    let b = Member::join(&server, "b", 32, &tenures).await?;
    wait_balanced(&[&a, &b], 32, &[16, 16], bound).await?;
    let before = tenures.all().len();

    tokio::task::block_in_place(|| server.restart_in_place())?;
    // Let every member's lease either survive or lapse, then settle again.
    tokio::time::sleep(LEASE).await;
    let took = wait_balanced(&[&a, &b], 32, &[16, 16], LEASE * 6).await?;
    eprintln!(
        "restart: balanced again {took:?} after the first lease, {} leases taken anew",
        tenures.all().len() - before
    );
    // Still renewing: two more lease periods and nothing moves.
    let settled = tenures.all().len();
    tokio::time::sleep(LEASE * 2).await;
    wait_balanced(&[&a, &b], 32, &[16, 16], Duration::ZERO).await?;
    assert_eq!(
        tenures.all().len(),
        settled,
        "leases changed hands while nothing happened"
    );
    // And the watches still work: a newcomer is seen and given its share.
    let c = Member::join(&server, "c", 32, &tenures).await?;
    let loads: Vec<usize> = ["a", "b", "c"]
        .iter()
        .map(|m| assign::share(GROUP, ["a", "b", "c"], 32, m).len())
        .collect();
    wait_balanced(&[&a, &b, &c], 32, &loads, bound).await?;
    tenures.assert_exclusive();
    for m in [a, b, c] {
        m.membership.leave().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_whose_leases_would_not_expire_in_time_is_refused() -> Result<()> {
    let server = server()?;
    let operator = jetstream::new(connect_as(&server, Role::Operator).await?);
    // Made by hand with the defaults: no per-key TTL, several messages a key.
    operator
        .create_key_value(kv::Config {
            bucket: Subjects::default().ownership_bucket(),
            history: 5,
            ..Default::default()
        })
        .await?;
    let js = jetstream::new(connect_as(&server, Role::Scheduler).await?);
    match Membership::join(js, Config::new(GROUP, 4, LEASE, "a")?).await {
        Err(::ownership::Error::BucketConfig(bucket)) => assert_eq!(bucket, "TS_OWNERSHIP"),
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("joined a group in a bucket whose leases never expire"),
    }
    // Configs that cannot work are refused before anything is written.
    for bad in [
        Config::new("a.b", 4, LEASE, "a"),
        Config::new(GROUP, 0, LEASE, "a"),
        Config::new(GROUP, 4, Duration::from_millis(500), "a"),
        Config::new(GROUP, 4, LEASE, "a b"),
    ] {
        assert!(matches!(bad, Err(::ownership::Error::Config(_))), "{bad:?}");
    }
    Ok(())
}
