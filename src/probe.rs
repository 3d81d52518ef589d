//! Failure detection by probing (sans-IO): the decisions, no sockets, no clock.
//!
//! Every node already holds an authenticated connection to every member, and a closed
//! connection is noticed at once. What a connection cannot tell quickly is a peer that went
//! silent without closing (a frozen or killed process over QUIC, a host that vanished): only
//! the transport's idle timeout would, after seconds. Gossip heartbeats used to, at the price of
//! a full digest to three peers ten times a second — traffic that grows with the cluster.
//!
//! This is SWIM's idea over the links we have, with a cost flat in the cluster size:
//! - Every `interval`, a node pings **one** member, taking them in a shuffled round (each
//!   member is probed by someone about once per `interval`, whatever the cluster size).
//! - A ping unanswered within `timeout` makes the node *suspect* the member: it tells the
//!   other members (one small message each) and pings the suspect again.
//! - A node that suspects a member — from its own ping or from another's word — and whose own
//!   ping then goes unanswered for `timeout` *declares* it: it closes its connection and drops
//!   the member. Two unanswered pings in a row from this node are needed, so one slow answer
//!   or one node's bad link does not remove a member.
//!
//! A member is thus declared by everyone about `interval` + 2 × `timeout` after it went silent.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::peers::NodeId;

/// What the prober wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Out {
    /// Send a ping with this number to `node`.
    Ping { node: NodeId, nonce: u64 },
    /// Tell the other members that `node` is suspected.
    Suspect { node: NodeId },
    /// `node` did not answer twice: close its connection and drop it.
    Declare { node: NodeId },
}

#[derive(Debug)]
struct Pending {
    nonce: u64,
    deadline: Instant,
    /// This ping checks a suspicion: unanswered, the node is declared.
    confirming: bool,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Prober {
    timeout: Duration,
    /// This round's order of members to ping, and the position in it.
    round: Vec<NodeId>,
    next: usize,
    pending: HashMap<NodeId, Pending>,
    nonce: u64,
}

impl Prober {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            round: Vec::new(),
            next: 0,
            pending: HashMap::new(),
            nonce: 0,
        }
    }

    fn ping(&mut self, now: Instant, node: NodeId, confirming: bool, out: &mut Vec<Out>) {
        self.nonce = self.nonce.wrapping_add(1);
        self.pending.insert(
            node,
            Pending {
                nonce: self.nonce,
                deadline: now + self.timeout,
                confirming,
            },
        );
        out.push(Out::Ping {
            node,
            nonce: self.nonce,
        });
    }

    /// One period: expire pings, then ping the next member of the round. `members` are the
    /// members that can be probed now; `shuffle` orders a new round.
    pub(crate) fn tick(
        &mut self,
        now: Instant,
        members: &[NodeId],
        mut shuffle: impl FnMut(&mut [NodeId]),
    ) -> Vec<Out> {
        let mut out = Vec::new();
        self.expire_into(now, members, &mut out);
        // The next member of the round that is still a member and not being pinged already.
        for _ in 0..=members.len() {
            if self.next >= self.round.len() {
                self.round = members.to_vec();
                shuffle(&mut self.round);
                self.next = 0;
                if self.round.is_empty() {
                    break;
                }
            }
            let node = self.round[self.next];
            self.next += 1;
            if members.contains(&node) && !self.pending.contains_key(&node) {
                self.ping(now, node, false, &mut out);
                break;
            }
        }
        out
    }

    /// `node` answered ping `nonce`: whatever was suspected of it is cleared.
    pub(crate) fn on_pong(&mut self, node: NodeId, nonce: u64) {
        if self.pending.get(&node).is_some_and(|p| p.nonce == nonce) {
            self.pending.remove(&node);
        }
    }

    /// Another member suspects `node`: check it with a ping of our own (unanswered, it is
    /// declared). Returns the ping to send, if a new one is needed.
    pub(crate) fn on_suspect(&mut self, now: Instant, node: NodeId) -> Option<Out> {
        match self.pending.get_mut(&node) {
            // A ping is out already: its answer decides.
            Some(p) => {
                p.confirming = true;
                None
            }
            None => {
                let mut out = Vec::new();
                self.ping(now, node, true, &mut out);
                out.pop()
            }
        }
    }

    /// When the earliest ping in flight times out, if any (acted on by the next
    /// [`tick`](Self::tick) at or after it).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Expire the pings past their deadline without pinging anyone new.
    pub(crate) fn expire(&mut self, now: Instant, members: &[NodeId]) -> Vec<Out> {
        let mut out = Vec::new();
        self.expire_into(now, members, &mut out);
        out
    }

    fn expire_into(&mut self, now: Instant, members: &[NodeId], out: &mut Vec<Out>) {
        let live: HashSet<NodeId> = members.iter().copied().collect();
        self.pending.retain(|node, _| live.contains(node));
        let expired: Vec<(NodeId, bool)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(node, p)| (*node, p.confirming))
            .collect();
        for (node, confirming) in expired {
            if confirming {
                self.pending.remove(&node);
                out.push(Out::Declare { node });
            } else {
                out.push(Out::Suspect { node });
                self.ping(now, node, true, out);
            }
        }
    }

    /// A member's connection closed or it was dropped: nothing pending for it.
    pub(crate) fn forget(&mut self, node: &NodeId) {
        self.pending.remove(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<NodeId> {
        (0..n).map(|_| NodeId::new()).collect()
    }

    const T: Duration = Duration::from_millis(500);

    fn pinged(out: &[Out]) -> Vec<NodeId> {
        out.iter()
            .filter_map(|o| match o {
                Out::Ping { node, .. } => Some(*node),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_member_per_period_each_once_per_round() {
        let m = ids(5);
        let mut p = Prober::new(T);
        let now = Instant::now();
        let mut seen = Vec::new();
        for i in 0..5 {
            let out = p.tick(now, &m, |_| {});
            assert_eq!(out.len(), 1, "{out:?}");
            let Out::Ping { node, nonce } = out[0] else {
                panic!("{out:?}")
            };
            seen.push(node);
            p.on_pong(node, nonce);
            assert_eq!(i + 1, seen.len());
        }
        seen.sort();
        let mut all = m.clone();
        all.sort();
        assert_eq!(seen, all, "a round pings every member once");
    }

    #[test]
    fn silence_is_suspected_then_declared() {
        let m = ids(1);
        let mut p = Prober::new(T);
        let t0 = Instant::now();
        assert_eq!(pinged(&p.tick(t0, &m, |_| {})), m);
        // Not yet due.
        assert!(p.tick(t0 + T / 2, &m, |_| {}).is_empty());
        let out = p.tick(t0 + T, &m, |_| {});
        assert_eq!(out[0], Out::Suspect { node: m[0] });
        assert_eq!(pinged(&out), m, "the suspect is pinged again");
        let out = p.tick(t0 + T * 2, &m, |_| {});
        assert_eq!(out[0], Out::Declare { node: m[0] });
    }

    #[test]
    fn pings_expire_at_their_deadline_between_periods() {
        let m = ids(1);
        let mut p = Prober::new(T);
        let t0 = Instant::now();
        assert_eq!(p.next_deadline(), None);
        p.tick(t0, &m, |_| {});
        assert_eq!(p.next_deadline(), Some(t0 + T));
        assert!(p.expire(t0 + T / 2, &m).is_empty());
        let out = p.expire(t0 + T, &m);
        assert_eq!(out[0], Out::Suspect { node: m[0] });
        assert_eq!(p.next_deadline(), Some(t0 + T * 2));
        assert_eq!(p.expire(t0 + T * 2, &m), vec![Out::Declare { node: m[0] }]);
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn an_answer_clears_a_suspicion() {
        let m = ids(1);
        let mut p = Prober::new(T);
        let t0 = Instant::now();
        p.tick(t0, &m, |_| {});
        let out = p.tick(t0 + T, &m, |_| {});
        let Some(Out::Ping { nonce, .. }) = out.last().cloned() else {
            panic!("{out:?}")
        };
        // An answer to an older ping does not count.
        p.on_pong(m[0], nonce - 1);
        p.on_pong(m[0], nonce);
        let out = p.tick(t0 + T * 2, &m, |_| {});
        assert!(
            !out.iter().any(|o| matches!(o, Out::Declare { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn another_nodes_suspicion_is_checked_with_our_own_ping() {
        let m = ids(3);
        let mut p = Prober::new(T);
        let t0 = Instant::now();
        let Some(Out::Ping { node, nonce }) = p.on_suspect(t0, m[1]) else {
            panic!("a ping to check the suspicion")
        };
        assert_eq!(node, m[1]);
        // Answered: nothing happens.
        p.on_pong(node, nonce);
        assert!(
            !p.tick(t0 + T, &m, |_| {})
                .iter()
                .any(|o| matches!(o, Out::Declare { .. }))
        );
        // Unanswered: declared after one timeout (the suspicion came from elsewhere).
        p.on_suspect(t0 + T, m[2]);
        let out = p.tick(t0 + T * 2, &m, |_| {});
        assert!(out.contains(&Out::Declare { node: m[2] }), "{out:?}");
    }

    #[test]
    fn departed_members_are_not_pinged_or_declared() {
        let m = ids(2);
        let mut p = Prober::new(T);
        let t0 = Instant::now();
        p.tick(t0, &m, |_| {});
        p.tick(t0, &m, |_| {});
        // Both pinged; both leave.
        let out = p.tick(t0 + T * 3, &[], |_| {});
        assert!(out.is_empty(), "{out:?}");
    }
}
