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

/// A ping waits at most this many times the configured timeout, however slow answers get.
const MAX_STRETCH: u32 = 8;

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
    /// The number of the first ping of this check: a late answer to it still proves life.
    first: u64,
    sent: Instant,
    deadline: Instant,
    /// This ping checks a suspicion: unanswered, the node is declared.
    confirming: bool,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Prober {
    /// The configured timeout: the least a ping waits.
    timeout: Duration,
    /// Smoothed answer time and its variation (as TCP's retransmission timer): under load a
    /// ping waits longer, so a busy node is not taken for a dead one.
    srtt: Option<Duration>,
    rttvar: Duration,
    /// How late this node's own periods fire (rises at once, decays slowly): a node too busy
    /// to run its timers on time cannot judge others by them, so its pings wait that much
    /// longer (Lifeguard's local health, in its simplest form).
    lag: Duration,
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
            srtt: None,
            rttvar: Duration::ZERO,
            lag: Duration::ZERO,
            round: Vec::new(),
            next: 0,
            pending: HashMap::new(),
            nonce: 0,
        }
    }

    /// How long a ping waits now: the configured timeout, or the smoothed answer time plus
    /// four times its variation if longer, plus twice this node's own lag (at most
    /// [`MAX_STRETCH`] times the timeout).
    pub(crate) fn current_timeout(&self) -> Duration {
        let rto = self.srtt.map_or(Duration::ZERO, |s| s + self.rttvar * 4);
        (rto.max(self.timeout) + self.lag * 2).min(self.timeout * MAX_STRETCH)
    }

    /// This period fired `late` after it was due.
    pub(crate) fn note_lag(&mut self, late: Duration) {
        self.lag = late.max(self.lag * 7 / 8);
    }

    fn ping(&mut self, now: Instant, node: NodeId, confirming: bool, out: &mut Vec<Out>) {
        self.nonce = self.nonce.wrapping_add(1);
        let first = self.pending.get(&node).map_or(self.nonce, |p| p.first);
        let deadline = now + self.current_timeout();
        self.pending.insert(
            node,
            Pending {
                nonce: self.nonce,
                first,
                sent: now,
                deadline,
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
        // A member new since the round began joins the rest of this round at a random place
        // (as SWIM does), rather than waiting for the next round: one round lasts
        // `interval` × N, seconds at 100 nodes, and a node that crashes soon after it joined
        // must be probed as soon as any other.
        if self.next < self.round.len() {
            let fresh: Vec<NodeId> = members
                .iter()
                .filter(|m| !self.round.contains(m))
                .copied()
                .collect();
            if !fresh.is_empty() {
                self.round.extend(fresh);
                shuffle(&mut self.round[self.next..]);
            }
        }
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
    pub(crate) fn on_pong(&mut self, now: Instant, node: NodeId, nonce: u64) {
        let Some(p) = self.pending.get(&node) else {
            return;
        };
        if !(p.first..=p.nonce).contains(&nonce) {
            return;
        }
        if p.nonce == nonce {
            let rtt = now.saturating_duration_since(p.sent);
            match self.srtt {
                None => {
                    self.srtt = Some(rtt);
                    self.rttvar = rtt / 2;
                }
                Some(srtt) => {
                    let diff = srtt.abs_diff(rtt);
                    self.rttvar = (self.rttvar * 3 + diff) / 4;
                    self.srtt = Some((srtt * 7 + rtt) / 8);
                }
            }
        }
        self.pending.remove(&node);
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
            p.on_pong(now, node, nonce);
            assert_eq!(i + 1, seen.len());
        }
        seen.sort();
        let mut all = m.clone();
        all.sort();
        assert_eq!(seen, all, "a round pings every member once");
    }

    #[test]
    fn a_member_new_since_the_round_began_is_pinged_in_this_round() {
        let m = ids(4);
        let mut p = Prober::new(T);
        let now = Instant::now();
        let first = pinged(&p.tick(now, &m[..3], |_| {}));
        p.on_pong(now, first[0], 1);
        // m[3] joins: the two members left in this round and m[3] are pinged next, before
        // any member is pinged a second time (without shuffling, a new round would start
        // with m[0] again).
        let mut rest = Vec::new();
        for _ in 0..3 {
            let out = pinged(&p.tick(now, &m, |_| {}));
            let Some(node) = out.first().copied() else {
                panic!("no ping: {out:?}")
            };
            assert!(!rest.contains(&node) && node != first[0], "{node} twice");
            rest.push(node);
            p.pending.clear();
        }
        assert!(rest.contains(&m[3]), "{rest:?}");
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

    /// One period pinging the only member, answered `after` the ping.
    fn answered(p: &mut Prober, m: &[NodeId], now: Instant, after: Duration) {
        let out = p.tick(now, m, |_| {});
        let Some(Out::Ping { node, nonce }) = out.last().cloned() else {
            panic!("{out:?}")
        };
        p.on_pong(now + after, node, nonce);
    }

    #[test]
    fn slow_answers_stretch_the_timeout_within_a_bound() {
        let m = ids(1);
        let mut p = Prober::new(T);
        let mut now = Instant::now();
        assert_eq!(p.current_timeout(), T);
        // Answered just in time, each time: the node is busy, not dead.
        for _ in 0..20 {
            answered(&mut p, &m, now, T - Duration::from_millis(1));
            now += T;
        }
        assert!(p.current_timeout() > T, "{:?}", p.current_timeout());
        assert!(p.current_timeout() <= T * MAX_STRETCH);
        // Fast answers bring it back down to the configured timeout.
        for _ in 0..40 {
            answered(&mut p, &m, now, Duration::ZERO);
        }
        assert_eq!(p.current_timeout(), T);
    }

    #[test]
    fn a_node_late_on_its_own_timers_waits_longer() {
        let mut p = Prober::new(T);
        p.note_lag(Duration::from_millis(100));
        assert_eq!(p.current_timeout(), T + Duration::from_millis(200));
        for _ in 0..100 {
            p.note_lag(Duration::ZERO);
        }
        assert!(p.current_timeout() < T + Duration::from_millis(5));
        p.note_lag(Duration::from_secs(60));
        assert_eq!(p.current_timeout(), T * MAX_STRETCH);
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
        // An answer to a ping of another check does not count; a late one to this check's
        // first ping does.
        p.on_pong(t0 + T, m[0], nonce - 2);
        assert!(p.next_deadline().is_some());
        p.on_pong(t0 + T, m[0], nonce - 1);
        assert_eq!(p.next_deadline(), None);
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
        p.on_pong(t0, node, nonce);
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
