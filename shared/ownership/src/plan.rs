//! What a member does next: a pure function of what it has seen in the bucket (the
//! [`View`]), what it holds or is doing itself ([`Local`]) and whether it is leaving.
//! The driver (`member.rs`) carries the actions out and feeds the results back.

use std::collections::{BTreeMap, BTreeSet};

use crate::assign;

/// One partition key as last seen in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// Someone's lease: the key's newest message is a put.
    Held {
        /// The member id in the value.
        holder: String,
        /// The key's revision (its stream sequence).
        revision: u64,
        /// The lease's fencing token (the revision that acquired it).
        token: u64,
    },
    /// Released or expired: the newest message is a delete or purge marker (revision
    /// 0: the key has no message at all).
    Free {
        /// The marker's revision, which a `create` must expect.
        revision: u64,
    },
}

impl KeyState {
    fn revision(&self) -> u64 {
        match self {
            KeyState::Held { revision, .. } | KeyState::Free { revision } => *revision,
        }
    }
}

/// The group as seen through the bucket watch.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Member ids whose member key is present.
    pub members: BTreeSet<String>,
    /// Partition keys seen (absent: never seen).
    pub keys: BTreeMap<u32, KeyState>,
}

impl View {
    /// Takes in a newer state of partition `p` (older revisions are ignored: the watch
    /// delivers in order, but a direct read may race with it).
    pub fn observe(&mut self, p: u32, state: KeyState) {
        match self.keys.get(&p) {
            Some(old) if old.revision() > state.revision() && state.revision() != 0 => {}
            _ => {
                self.keys.insert(p, state);
            }
        }
    }
}

/// What this member is doing with a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// A `create` is in flight.
    Acquiring,
    /// Held: the lease with its token and last known revision; `revoked` once the
    /// user was told to stop (the key is released when the work has stopped).
    Held {
        /// The fencing token.
        token: u64,
        /// The key's newest revision written by us.
        revision: u64,
        /// Told to stop; released once stopped.
        revoked: bool,
    },
    /// Lost or released: waiting for the user's work to stop, or a delete in flight.
    /// Nothing new is started for the partition meanwhile.
    Stopping,
}

/// A step to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the key, expecting its last revision to be `expect` (0: no message).
    Acquire {
        /// The partition.
        partition: u32,
        /// The revision the create expects.
        expect: u64,
    },
    /// Tell the user to stop; release once stopped.
    Revoke {
        /// The partition.
        partition: u32,
    },
    /// The bucket shows someone else's write after ours: the lease is gone.
    Lost {
        /// The partition.
        partition: u32,
    },
    /// Our own key, which we do not hold (a create whose answer was lost, a lease
    /// given up locally before it expired): delete it so others need not wait.
    DeleteOrphan {
        /// The partition.
        partition: u32,
        /// Its revision.
        revision: u64,
    },
    /// Held by a member that is no longer live: read the key again (its expiry marker
    /// may have come and gone unseen).
    Probe {
        /// The partition.
        partition: u32,
    },
}

/// What a member does next with what it knows. `partitions` fixed for the group; `me`
/// counts as live whatever the view says (it is running this).
pub fn decide(
    group: &str,
    me: &str,
    partitions: u32,
    view: &View,
    local: &BTreeMap<u32, Local>,
    leaving: bool,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let desired = if leaving {
        BTreeSet::new()
    } else {
        let members = view
            .members
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(me));
        assign::share(group, members, partitions, me)
    };
    for (&p, l) in local {
        let Local::Held {
            token,
            revision,
            revoked,
        } = l
        else {
            continue;
        };
        let overtaken = match view.keys.get(&p) {
            Some(KeyState::Held {
                holder,
                revision: r,
                token: t,
            }) => *r > *revision && (holder != me || t != token),
            Some(KeyState::Free { revision: r }) => *r > *revision,
            None => false,
        };
        if overtaken {
            actions.push(Action::Lost { partition: p });
        } else if !revoked && !desired.contains(&p) {
            actions.push(Action::Revoke { partition: p });
        }
    }
    for p in 0..partitions {
        if local.contains_key(&p) {
            continue;
        }
        match view.keys.get(&p) {
            None if desired.contains(&p) => actions.push(Action::Acquire {
                partition: p,
                expect: 0,
            }),
            Some(KeyState::Free { revision }) if desired.contains(&p) => {
                actions.push(Action::Acquire {
                    partition: p,
                    expect: *revision,
                })
            }
            Some(KeyState::Held {
                holder, revision, ..
            }) if holder == me => actions.push(Action::DeleteOrphan {
                partition: p,
                revision: *revision,
            }),
            Some(KeyState::Held { holder, .. })
                if desired.contains(&p) && !view.members.contains(holder) =>
            {
                actions.push(Action::Probe { partition: p })
            }
            _ => {}
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(members: &[&str], keys: &[(u32, KeyState)]) -> View {
        View {
            members: members.iter().map(|m| m.to_string()).collect(),
            keys: keys.iter().cloned().collect(),
        }
    }

    fn held(holder: &str, revision: u64, token: u64) -> KeyState {
        KeyState::Held {
            holder: holder.into(),
            revision,
            token,
        }
    }

    fn mine(token: u64, revision: u64) -> Local {
        Local::Held {
            token,
            revision,
            revoked: false,
        }
    }

    #[test]
    fn alone_it_takes_every_free_partition_and_waits_for_held_ones() {
        let v = view(
            &["a"],
            &[(1, KeyState::Free { revision: 7 }), (2, held("b", 9, 9))],
        );
        let actions = decide("g", "a", 3, &v, &BTreeMap::new(), false);
        assert_eq!(
            actions,
            vec![
                Action::Acquire {
                    partition: 0,
                    expect: 0
                },
                Action::Acquire {
                    partition: 1,
                    expect: 7
                },
                // b is not a live member: its key is read again until it expires.
                Action::Probe { partition: 2 },
            ]
        );
        // While b is live, a waits without probing.
        let v = view(&["a", "b"], &[(2, held("b", 9, 9))]);
        let wanted = assign::share("g", ["a", "b"], 3, "a");
        let actions = decide("g", "a", 3, &v, &BTreeMap::new(), false);
        assert!(actions.iter().all(|x| matches!(x, Action::Acquire { partition, .. } if wanted.contains(partition) && *partition != 2)));
    }

    #[test]
    fn a_partition_that_belongs_to_another_member_is_revoked_and_nothing_in_flight_is_touched() {
        let share_a = assign::share("g", ["a", "b"], 8, "a");
        let theirs = (0..8).find(|p| !share_a.contains(p)).unwrap();
        let ours = *share_a.iter().next().unwrap();
        let local: BTreeMap<u32, Local> = (0..8)
            .map(|p| {
                if p == theirs || p == ours {
                    (p, mine(10 + p as u64, 10 + p as u64))
                } else {
                    (p, Local::Stopping)
                }
            })
            .collect();
        let v = view(&["a", "b"], &[]);
        assert_eq!(
            decide("g", "a", 8, &v, &local, false),
            vec![Action::Revoke { partition: theirs }]
        );
        // Revoked once: not again.
        let mut revoked = local.clone();
        revoked.insert(
            theirs,
            Local::Held {
                token: 1,
                revision: 1,
                revoked: true,
            },
        );
        assert!(decide("g", "a", 8, &v, &revoked, false).is_empty());
        // Leaving: everything held is revoked, nothing acquired.
        let all = decide("g", "a", 8, &v, &local, true);
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|x| matches!(x, Action::Revoke { .. })));
    }

    #[test]
    fn a_newer_write_by_someone_else_means_lost_and_an_older_view_means_nothing() {
        let local: BTreeMap<u32, Local> = [(0, mine(5, 8))].into();
        for (state, lost) in [
            (held("b", 9, 9), true),
            (KeyState::Free { revision: 9 }, true),
            (held("a", 9, 5), false), // our own renewal, seen late
            (held("a", 6, 5), false), // an old revision of ours
            (held("b", 4, 4), false), // the previous holder, seen late
            (KeyState::Free { revision: 3 }, false),
        ] {
            let v = view(&["a"], &[(0, state.clone())]);
            let actions = decide("g", "a", 1, &v, &local, false);
            assert_eq!(
                actions.contains(&Action::Lost { partition: 0 }),
                lost,
                "{state:?}"
            );
        }
    }

    #[test]
    fn our_own_key_that_we_do_not_hold_is_deleted() {
        let v = view(&["a", "b"], &[(0, held("a", 12, 12))]);
        let actions = decide("g", "a", 1, &v, &BTreeMap::new(), false);
        assert_eq!(
            actions,
            vec![Action::DeleteOrphan {
                partition: 0,
                revision: 12
            }]
        );
    }

    #[test]
    fn a_stale_read_does_not_move_the_view_back() {
        let mut v = View::default();
        v.observe(0, held("a", 10, 10));
        v.observe(0, held("b", 4, 4));
        assert_eq!(v.keys[&0], held("a", 10, 10));
        // Revision 0 (no message at all: an expired marker) is always taken.
        v.observe(0, KeyState::Free { revision: 0 });
        assert_eq!(v.keys[&0], KeyState::Free { revision: 0 });
    }
}
