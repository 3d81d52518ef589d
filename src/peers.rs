//! The peer table (sans-IO): who to dial, which connection carries a peer's traffic, when to
//! retry. It takes `now` and events, and returns [`Action`]s; the driver in `mesh.rs` performs
//! them. No sockets, no clock, no tasks here.
//!
//! # One connection per node pair
//!
//! A connection is *canonical* when the dialer's node id is lower than the acceptor's. Only
//! canonical connections carry commands and requests, so both ends agree on the one connection
//! without a race. Other connections (a higher node dialing a seed address, say) carry only
//! gossip until the canonical one exists, then are closed. The lower node therefore dials every
//! live higher member; a higher node reaches a lower one by gossip, which makes it dial back.

pub(crate) use crate::backoff::Backoff;
use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use socketioxide_core::Sid;

/// A node id, as used in tables (the `Sid` inside a socketioxide `Uid`).
pub(crate) type NodeId = Sid;

use crate::wire::CloseCode;

/// A connection id, unique in the process (given by the transport).
pub(crate) type ConnId = u64;

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Dial this address.
    Dial(SocketAddr),
    /// Close this connection.
    Close { conn: ConnId, code: CloseCode },
    /// The connection carrying `node`'s commands and requests changed (`None`: none for now).
    Route { node: NodeId, conn: Option<ConnId> },
    /// Forget `node`: it died or left; drop its queue and fail what waits on it.
    Forget { node: NodeId },
    /// `addr` belonged to a member declared dead (or gone): gossip no longer dials it.
    StopDialing { addr: SocketAddr },
}

#[derive(Debug)]
struct Node {
    addr: SocketAddr,
    /// Listed live by membership.
    live: bool,
    canonical: Option<ConnId>,
    /// Non-canonical connections (gossip only).
    others: Vec<ConnId>,
    /// Its canonical connection closed (not with a goodbye) and none replaced it yet.
    lost: Option<Lost>,
    /// It had a canonical connection once.
    reached: bool,
    /// Another member suspects it (see [`PeerTable::check`]).
    suspected: bool,
}

impl Node {
    /// A node at `addr` without connections yet.
    fn new(addr: SocketAddr, live: bool) -> Self {
        Self {
            addr,
            live,
            canonical: None,
            others: Vec::new(),
            lost: None,
            reached: false,
            suspected: false,
        }
    }
}

/// A member whose connection closed: redialed at once; listed for `link_grace`, then dropped
/// until it is back; declared dead when a redial fails.
#[derive(Debug, Clone, Copy)]
struct Lost {
    since: Instant,
    /// The grace ran out: it was dropped ([`Action::Forget`]) and is not listed.
    dropped: bool,
}

#[derive(Debug)]
struct Addr {
    dialing: bool,
    wanted: bool,
    failures: u32,
    next_attempt: Instant,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct PeerTable {
    me: NodeId,
    my_addr: SocketAddr,
    backoff: Backoff,
    max_addrs: usize,
    nodes: HashMap<NodeId, Node>,
    addrs: HashMap<SocketAddr, Addr>,
    /// Which node each open connection belongs to.
    conns: HashMap<ConnId, NodeId>,
    /// Addresses of members declared dead or gone, and since when. Gossip wants them (chitchat
    /// keeps gossiping to dead members for their grace period) but is no reason to dial: a
    /// node that comes back dials us itself. Seeds still dial them.
    dead: HashMap<SocketAddr, Instant>,
    /// Members this node declared dead itself (a failed redial, unanswered probes) while
    /// gossip may still list them: not members again until they connect.
    declared: HashMap<NodeId, Instant>,
    /// Members whose declaration ran out while gossip still lists them: dialed again
    /// (whichever side we are), but listed only once a connection proves them alive; a failed
    /// dial declares them again. Gossip keeps a crashed member for a minute or more, and it
    /// must not come back as a member every [`DECLARED_FOR`] meanwhile.
    retrying: HashSet<NodeId>,
    /// How long a member whose connection closed stays listed, waiting for a new one.
    link_grace: Duration,
    /// Members this node declared dead itself, since it started.
    declared_total: u64,
    /// The members gossip listed last (for declarations that expire).
    live: Vec<(NodeId, SocketAddr)>,
    actions: VecDeque<Action>,
}

/// How long a dead member's address is not dialed for gossip (chitchat's default grace for
/// dead members in this crate is as long).
pub(crate) const DEAD_ADDR_MEMORY: Duration = Duration::from_secs(300);
/// Dials in progress at once, at most. A fleet started together (every node dialing every
/// lower... higher id at the same moment) would otherwise start hundreds of TLS handshakes per
/// node and time them all out on a saturated machine; the rest wait their turn.
pub(crate) const MAX_CONCURRENT_DIALS: usize = 8;
/// Quick retries of a bare address (a seed) whose dial failed, before it waits to be wanted
/// again: nodes started together find each other although some listen a moment later.
const BARE_ADDR_RETRIES: u32 = 6;
/// How long a member this node declared dead stays out while gossip still lists it.
pub(crate) const DECLARED_FOR: Duration = Duration::from_secs(10);
/// Failed dials to a member gossip lists but we never reached before it counts as dead.
const NEVER_REACHED_TRIES: u32 = 3;

/// Note `key` at `now` in a map of at most `max` entries (entries older than
/// [`DEAD_ADDR_MEMORY`] make room first). `None` when it is full; otherwise whether `key` is
/// new.
fn remember<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Instant>,
    key: K,
    now: Instant,
    max: usize,
) -> Option<bool> {
    if map.len() >= max {
        map.retain(|_, since| now.duration_since(*since) < DEAD_ADDR_MEMORY);
        if map.len() >= max {
            return None;
        }
    }
    Some(map.insert(key, now).is_none())
}

impl PeerTable {
    pub(crate) fn new(
        me: NodeId,
        my_addr: SocketAddr,
        backoff: Backoff,
        max_addrs: usize,
        link_grace: Duration,
    ) -> Self {
        Self {
            me,
            my_addr,
            backoff,
            max_addrs,
            nodes: HashMap::new(),
            addrs: HashMap::new(),
            conns: HashMap::new(),
            dead: HashMap::new(),
            declared: HashMap::new(),
            retrying: HashSet::new(),
            link_grace,
            declared_total: 0,
            live: Vec::new(),
            actions: VecDeque::new(),
        }
    }

    /// Whether `node` is listed as a member: live in gossip, not declared dead here, and not
    /// without a connection for longer than the grace.
    pub(crate) fn listed(&self, node: &NodeId) -> bool {
        self.nodes.get(node).is_some_and(|n| {
            n.live
                && !n.lost.is_some_and(|l| l.dropped)
                && !(self.retrying.contains(node) && n.canonical.is_none() && n.others.is_empty())
                // Never reached, at our own address: an older incarnation of this node that
                // gossip still carries, which no dial will ever rule out.
                && (n.reached || n.addr != self.my_addr)
        })
    }

    /// Whether `node` has its canonical connection (the one probes and commands use).
    pub(crate) fn has_canonical(&self, node: &NodeId) -> bool {
        self.nodes.get(node).is_some_and(|n| n.canonical.is_some())
    }

    /// Another member suspects `node`, which we cannot probe (no canonical connection): dial
    /// it now; if that fails, it is declared dead (a node never reached too, at the first
    /// failure rather than after a few).
    pub(crate) fn check(&mut self, now: Instant, node: &NodeId) {
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        if n.canonical.is_some() {
            return;
        }
        n.suspected = true;
        let addr = n.addr;
        self.want_addr(now, addr);
        if let Some(a) = self.addrs.get_mut(&addr) {
            a.next_attempt = a.next_attempt.min(now);
        }
    }

    /// Declare `node` dead (its probes went unanswered): close its connections, drop it, and
    /// do not dial it until it connects again.
    pub(crate) fn declare(&mut self, now: Instant, node: NodeId) {
        let Some(n) = self.nodes.get(&node) else {
            return;
        };
        let addr = n.addr;
        // A restart in place: the address is another live node's now, and stays dialable.
        let reused = self
            .nodes
            .iter()
            .any(|(id, other)| *id != node && other.addr == addr && other.live);
        if !reused {
            self.mark_dead(now, addr, true);
        }
        remember(&mut self.declared, node, now, self.max_addrs);
        // Declared again after its declaration ran out: the same death, counted once.
        if !self.retrying.remove(&node) {
            self.declared_total += 1;
        }
        self.forget(node, CloseCode::PeerDead);
    }

    /// Members this node declared dead itself (probes, failed redials), since it started.
    pub(crate) fn declared_total(&self) -> u64 {
        self.declared_total
    }

    /// Whether a connection dialed by `dialer` to `acceptor` is canonical.
    pub(crate) fn is_canonical(dialer: NodeId, acceptor: NodeId) -> bool {
        dialer < acceptor
    }

    fn i_dial(&self, node: NodeId) -> bool {
        Self::is_canonical(self.me, node)
    }

    /// The full set of live members (without us), as membership sees it now.
    pub(crate) fn set_live(&mut self, now: Instant, live: &[(NodeId, SocketAddr)]) {
        self.live.clear();
        self.live.extend_from_slice(live);
        // A member we declared dead stays out until it connects again, or for
        // `DECLARED_FOR` (then, if gossip still lists it, it is tried again: two nodes that
        // declared each other would otherwise never meet again); once gossip forgets it, so
        // do we.
        let listed = |id: &NodeId| live.iter().any(|(l, _)| l == id);
        let retrying = &mut self.retrying;
        self.declared.retain(|id, since| {
            let keep = now.duration_since(*since) < DECLARED_FOR && listed(id);
            if !keep && listed(id) {
                retrying.insert(*id);
            }
            keep
        });
        self.retrying.retain(|id| listed(id));
        let live_ids: HashMap<NodeId, SocketAddr> = live
            .iter()
            .copied()
            .filter(|(id, _)| *id != self.me && !self.declared.contains_key(id))
            .collect();
        let gone: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, n)| n.live && !live_ids.contains_key(id))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            // Unless another live member took the address (a restart in place).
            if let Some(n) = self.nodes.get(&id)
                && !live_ids.values().any(|a| *a == n.addr)
            {
                let addr = n.addr;
                self.mark_dead(now, addr, true);
            }
            self.forget(id, CloseCode::PeerDead);
        }
        for (id, addr) in live_ids {
            self.dead.remove(&addr);
            let node = self
                .nodes
                .entry(id)
                .or_insert_with(|| Node::new(addr, true));
            node.live = true;
            node.addr = addr;
        }
    }

    /// The node said goodbye (closed with "leaving"): forget it now, without waiting for
    /// membership to notice.
    pub(crate) fn departed(&mut self, now: Instant, id: NodeId) {
        if let Some(n) = self.nodes.get(&id) {
            let addr = n.addr;
            // It said goodbye: nothing to report.
            self.mark_dead(now, addr, false);
        }
        self.forget(id, CloseCode::Leaving);
    }

    fn mark_dead(&mut self, now: Instant, addr: SocketAddr, report: bool) {
        let Some(new) = remember(&mut self.dead, addr, now, self.max_addrs) else {
            return;
        };
        if new && report {
            self.actions.push_back(Action::StopDialing { addr });
        }
        if let Some(a) = self.addrs.get_mut(&addr) {
            a.wanted = false;
        }
    }

    /// Gossip has a message for `addr` and no connection to carry it: dial, unless `addr` is
    /// a dead member's. Returns whether a dial is wanted.
    pub(crate) fn want_for_gossip(&mut self, now: Instant, addr: SocketAddr) -> bool {
        match self.dead.get(&addr) {
            Some(since) if now.duration_since(*since) < DEAD_ADDR_MEMORY => false,
            Some(_) => {
                self.dead.remove(&addr);
                self.want(now, addr);
                true
            }
            None => {
                self.want(now, addr);
                true
            }
        }
    }

    fn forget(&mut self, id: NodeId, code: CloseCode) {
        if let Some(node) = self.nodes.remove(&id) {
            for conn in node.canonical.into_iter().chain(node.others) {
                self.conns.remove(&conn);
                self.actions.push_back(Action::Close { conn, code });
            }
            self.actions.push_back(Action::Forget { node: id });
        }
    }

    /// A connection finished its handshake. `dialed` is true when we dialed it.
    pub(crate) fn connected(
        &mut self,
        now: Instant,
        conn: ConnId,
        node: NodeId,
        addr: SocketAddr,
        dialed: bool,
    ) {
        self.dead.remove(&addr);
        self.declared.remove(&node);
        self.retrying.remove(&node);
        // Connected, whichever side dialed: nothing more to want from this address (a member
        // we must dial is wanted again by `poll_action` while it lacks its canonical
        // connection). A dial of ours still in flight ends on its own.
        if let Some(a) = self.addrs.get_mut(&addr) {
            if dialed {
                a.dialing = false;
            }
            a.wanted = false;
            a.failures = 0;
            a.next_attempt = now;
        }
        let canonical = if dialed {
            Self::is_canonical(self.me, node)
        } else {
            Self::is_canonical(node, self.me)
        };
        self.conns.insert(conn, node);
        let entry = self
            .nodes
            .entry(node)
            .or_insert_with(|| Node::new(addr, false));
        entry.addr = addr;
        if canonical {
            entry.lost = None;
            entry.reached = true;
            entry.suspected = false;
            // The newest canonical connection wins: the dialer only dials when it has none,
            // so an older one still open here is one the dialer already gave up.
            if let Some(old) = entry.canonical.replace(conn) {
                self.conns.remove(&old);
                self.actions.push_back(Action::Close {
                    conn: old,
                    code: CloseCode::Replaced,
                });
            }
            for other in std::mem::take(&mut entry.others) {
                self.conns.remove(&other);
                self.actions.push_back(Action::Close {
                    conn: other,
                    code: CloseCode::Replaced,
                });
            }
            self.actions.push_back(Action::Route {
                node,
                conn: Some(conn),
            });
        } else if entry.canonical.is_some() {
            // Gossip has the canonical connection already.
            self.conns.remove(&conn);
            self.actions.push_back(Action::Close {
                conn,
                code: CloseCode::Replaced,
            });
        } else {
            entry.others.push(conn);
        }
    }

    /// A connection closed (for any reason).
    pub(crate) fn disconnected(&mut self, now: Instant, conn: ConnId) {
        let Some(id) = self.conns.remove(&conn) else {
            return;
        };
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        node.others.retain(|c| *c != conn);
        if node.canonical == Some(conn) {
            node.canonical = None;
            self.actions.push_back(Action::Route {
                node: id,
                conn: None,
            });
            let addr = node.addr;
            let live = node.live;
            if live {
                node.lost = Some(Lost {
                    since: now,
                    dropped: false,
                });
            }
            if !live && node.others.is_empty() {
                // Known only through that connection: nothing left to keep.
                self.forget(id, CloseCode::PeerDead);
            } else if live {
                // Redial soon, whichever side we are: the lower node to restore the canonical
                // connection, the higher one to be dialed back. A failed redial declares it.
                self.want_addr(now, addr);
                if let Some(a) = self.addrs.get_mut(&addr) {
                    a.next_attempt = now + self.backoff.min;
                }
            }
        } else if !node.live && node.canonical.is_none() && node.others.is_empty() {
            self.nodes.remove(&id);
        }
    }

    /// A dial failed.
    pub(crate) fn dial_failed(&mut self, now: Instant, addr: SocketAddr, jitter: f64) {
        let failures = self
            .addrs
            .get(&addr)
            .map_or(1, |a| a.failures.saturating_add(1));
        // A member whose connection closed, and that we cannot reach again, is dead; so is one
        // gossip told us about that we never reached in a few tries (a node that left before
        // we heard of it). A node new at an address another used (a restart in place) may
        // just be starting: the failure rules out the old one only. A gossip-only connection
        // proves nothing: a killed peer's stays open over QUIC until the idle timeout. A member
        // tried again after its declaration ran out is declared again at the first failure.
        let at_addr = self.nodes.values().filter(|n| n.addr == addr).count();
        let unreachable: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, n)| {
                n.addr == addr
                    && n.live
                    && n.canonical.is_none()
                    && (n.lost.is_some()
                        || (self.retrying.contains(*id) && n.others.is_empty() && at_addr == 1)
                        || (!n.reached
                            && at_addr == 1
                            && (n.suspected || failures >= NEVER_REACHED_TRIES)))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in unreachable {
            self.declare(now, id);
        }
        // A member we must dial is retried; a bare address a few times quickly, then only when
        // wanted again.
        let member = self
            .nodes
            .iter()
            .any(|(id, n)| n.addr == addr && n.canonical.is_none() && self.i_dial(*id) && n.live);
        let dead = self.dead.contains_key(&addr);
        // Both sides of a pair may dial at once (gossip wants the address before either
        // connection exists); the loser's dial is refused as `Replaced`. Retrying it would be
        // refused again and again: a connection to the address carries gossip already.
        let connected = self.has_conn_to(addr);
        if let Some(a) = self.addrs.get_mut(&addr) {
            a.dialing = false;
            a.failures = failures;
            a.wanted = member || (!dead && !connected && a.failures <= BARE_ADDR_RETRIES);
            a.next_attempt = now + self.backoff.delay(a.failures, jitter);
        }
    }

    /// Gossip or a seed source wants a connection to `addr`.
    pub(crate) fn want(&mut self, now: Instant, addr: SocketAddr) {
        if addr == self.my_addr || self.has_conn_to(addr) {
            return;
        }
        self.want_addr(now, addr);
    }

    fn want_addr(&mut self, now: Instant, addr: SocketAddr) {
        if !self.addrs.contains_key(&addr) && self.addrs.len() >= self.max_addrs {
            // Evict an idle entry; if none, skip this address (it will be wanted again).
            let idle = self
                .addrs
                .iter()
                .filter(|(_, a)| !a.dialing && !a.wanted)
                .map(|(k, _)| *k)
                .next();
            match idle {
                Some(k) => {
                    self.addrs.remove(&k);
                }
                None => return,
            }
        }
        let a = self.addrs.entry(addr).or_insert(Addr {
            dialing: false,
            wanted: false,
            failures: 0,
            next_attempt: now,
        });
        // A dial in flight answers the want already.
        a.wanted = !a.dialing;
    }

    fn addr_taken_by_other(&self, node: NodeId, addr: SocketAddr) -> bool {
        self.nodes.iter().any(|(id, n)| {
            *id != node && n.addr == addr && (n.canonical.is_some() || !n.others.is_empty())
        })
    }

    fn has_conn_to(&self, addr: SocketAddr) -> bool {
        self.nodes
            .values()
            .any(|n| n.addr == addr && (n.canonical.is_some() || !n.others.is_empty()))
    }

    /// The next action to perform, if any.
    #[must_use]
    pub(crate) fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        if self
            .declared
            .values()
            .any(|since| now.duration_since(*since) >= DECLARED_FOR)
        {
            let live = std::mem::take(&mut self.live);
            self.set_live(now, &live);
            if let Some(a) = self.actions.pop_front() {
                return Some(a);
            }
        }
        // Members without a connection past the grace: dropped until they are back.
        let grace = self.link_grace;
        let expired: Vec<NodeId> = self
            .nodes
            .iter_mut()
            .filter_map(|(id, n)| {
                let lost = n.lost.as_mut()?;
                (!lost.dropped && now.duration_since(lost.since) >= grace).then(|| {
                    lost.dropped = true;
                    *id
                })
            })
            .collect();
        if !expired.is_empty() {
            self.actions
                .extend(expired.into_iter().map(|node| Action::Forget { node }));
            return self.actions.pop_front();
        }
        // Members we must dial (we are the lower id) and have no canonical connection to. An
        // address now connected to another node (a restart at the same address, before the
        // old incarnation is declared dead) is not dialed again for the old one.
        // A member tried again after its declaration ran out is dialed whichever side we are:
        // only a connection lists it again.
        let to_dial: Vec<SocketAddr> = self
            .nodes
            .iter()
            .filter(|(id, n)| {
                n.canonical.is_none()
                    && ((self.i_dial(**id) && (n.live || !n.others.is_empty()))
                        || (self.retrying.contains(*id) && n.live && n.others.is_empty()))
                    && !self.addr_taken_by_other(**id, n.addr)
            })
            .map(|(_, n)| n.addr)
            .collect();
        for addr in to_dial {
            self.want_addr(now, addr);
        }
        if self.dials_in_progress() >= MAX_CONCURRENT_DIALS {
            return None;
        }
        let due = self
            .addrs
            .iter_mut()
            .find(|(_, a)| a.wanted && !a.dialing && a.next_attempt <= now);
        if let Some((addr, a)) = due {
            a.wanted = false;
            a.dialing = true;
            return Some(Action::Dial(*addr));
        }
        None
    }

    /// Members declared dead lately (their addresses are not dialed for gossip).
    pub(crate) fn dead_members(&self) -> usize {
        self.dead.len()
    }

    fn dials_in_progress(&self) -> usize {
        self.addrs.values().filter(|a| a.dialing).count()
    }

    /// When [`poll_action`](Self::poll_action) may have something new without any event (at
    /// the dial cap: none, the end of a dial is an event).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let grace = self
            .nodes
            .values()
            .filter_map(|n| n.lost.filter(|l| !l.dropped))
            .map(|l| l.since + self.link_grace)
            .chain(self.declared.values().map(|since| *since + DECLARED_FOR))
            .min();
        if self.dials_in_progress() >= MAX_CONCURRENT_DIALS {
            return grace;
        }
        self.addrs
            .values()
            .filter(|a| a.wanted && !a.dialing)
            .map(|a| a.next_attempt)
            .chain(grace)
            .min()
    }

    #[cfg(test)]
    /// The canonical connection of a node.
    pub(crate) fn route(&self, node: NodeId) -> Option<ConnId> {
        self.nodes.get(&node).and_then(|n| n.canonical)
    }

    #[cfg(test)]
    /// Number of addresses tracked for dialing (bounded by `max_addrs`).
    pub(crate) fn num_addrs(&self) -> usize {
        self.addrs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Two ids ordered: (low, high).
    fn ids() -> (NodeId, NodeId) {
        let (a, b) = (Sid::new(), Sid::new());
        if PeerTable::is_canonical(a, b) {
            (a, b)
        } else {
            (b, a)
        }
    }

    /// A table (of `low`) with one live member (`high`, at `addr(2)`), connected over
    /// connection 5, its actions before the connection drained.
    fn connected_member() -> (PeerTable, NodeId, NodeId, Instant) {
        let (low, high) = ids();
        let now = Instant::now();
        let mut t = table(low);
        t.set_live(now, &[(high, addr(2))]);
        drain(&mut t, now);
        t.connected(now, 5, high, addr(2), true);
        (t, low, high, now)
    }

    fn table(me: NodeId) -> PeerTable {
        PeerTable::new(
            me,
            addr(1),
            Backoff {
                min: 100 * MS,
                max: 1000 * MS,
            },
            8,
            GRACE,
        )
    }

    const GRACE: Duration = Duration::from_millis(1000);

    fn drain(t: &mut PeerTable, now: Instant) -> Vec<Action> {
        std::iter::from_fn(|| t.poll_action(now)).collect()
    }

    #[test]
    fn lower_node_dials_live_higher_member_once() {
        let (low, high) = ids();
        let now = Instant::now();
        let mut t = table(low);
        t.set_live(now, &[(high, addr(2))]);
        assert_eq!(drain(&mut t, now), vec![Action::Dial(addr(2))]);
        // Dial in flight: no second dial.
        t.set_live(now, &[(high, addr(2))]);
        assert_eq!(drain(&mut t, now), vec![]);
        t.connected(now, 7, high, addr(2), true);
        assert_eq!(
            drain(&mut t, now),
            vec![Action::Route {
                node: high,
                conn: Some(7)
            }]
        );
        assert_eq!(t.route(high), Some(7));
    }

    #[test]
    fn higher_node_waits_for_the_lower_one() {
        let (low, high) = ids();
        let now = Instant::now();
        let mut t = table(high);
        t.set_live(now, &[(low, addr(2))]);
        assert_eq!(drain(&mut t, now), vec![]);
        // The lower node dials us: canonical.
        t.connected(now, 3, low, addr(2), false);
        assert_eq!(
            drain(&mut t, now),
            vec![Action::Route {
                node: low,
                conn: Some(3)
            }]
        );
    }

    #[test]
    fn non_canonical_connection_makes_the_lower_node_dial_back_then_closes() {
        let (low, high) = ids();
        let now = Instant::now();
        let mut t = table(low);
        // The higher node dialed our address (gossip to a seed): not canonical.
        t.connected(now, 1, high, addr(2), false);
        assert_eq!(drain(&mut t, now), vec![Action::Dial(addr(2))]);
        t.connected(now, 2, high, addr(2), true);
        assert_eq!(
            drain(&mut t, now),
            vec![
                Action::Close {
                    conn: 1,
                    code: CloseCode::Replaced
                },
                Action::Route {
                    node: high,
                    conn: Some(2)
                }
            ]
        );
    }

    #[test]
    fn a_closed_connection_keeps_the_member_for_the_grace_then_drops_it() {
        let (mut t, _, high, now) = connected_member();
        drain(&mut t, now);
        t.disconnected(now, 5);
        assert!(t.listed(&high), "listed during the grace");
        let acts = drain(&mut t, now + 100 * MS);
        assert!(acts.contains(&Action::Dial(addr(2))), "redialed: {acts:?}");
        assert_eq!(
            drain(&mut t, now + GRACE),
            vec![Action::Forget { node: high }]
        );
        assert!(!t.listed(&high), "dropped past the grace");
        // Back: listed again, routed on the new connection.
        t.connected(now + GRACE, 6, high, addr(2), true);
        assert!(t.listed(&high));
        assert!(drain(&mut t, now + GRACE).contains(&Action::Route {
            node: high,
            conn: Some(6)
        }));
    }

    #[test]
    fn a_failed_redial_declares_the_member_and_gossip_cannot_bring_it_back() {
        let (mut t, _, high, now) = connected_member();
        drain(&mut t, now);
        t.disconnected(now, 5);
        drain(&mut t, now + 100 * MS);
        t.dial_failed(now + 200 * MS, addr(2), 0.5);
        let acts = drain(&mut t, now + 200 * MS);
        assert!(
            acts.contains(&Action::StopDialing { addr: addr(2) }),
            "{acts:?}"
        );
        assert!(acts.contains(&Action::Forget { node: high }), "{acts:?}");
        // Gossip still lists it: not a member, not dialed.
        t.set_live(now + 300 * MS, &[(high, addr(2))]);
        assert!(!t.listed(&high));
        assert_eq!(drain(&mut t, now + DECLARED_FOR / 2), vec![]);
        // It dials us: a member again.
        t.connected(now + DECLARED_FOR / 2, 7, high, addr(2), false);
        t.set_live(now + DECLARED_FOR / 2, &[(high, addr(2))]);
        assert!(t.listed(&high));
    }

    /// A declaration runs out while gossip still lists the member (gossip keeps a crashed
    /// member for a minute or more): it is dialed again, whichever side we are, but listed
    /// only once connected. A failed dial declares it again (counted once); a connection (two
    /// nodes that declared each other) makes it a member again.
    #[test]
    fn a_declaration_expires_while_gossip_still_lists_the_member() {
        for we_dial in [true, false] {
            let (low, high) = ids();
            let (me, other) = if we_dial { (low, high) } else { (high, low) };
            let now = Instant::now();
            let mut t = table(me);
            t.set_live(now, &[(other, addr(2))]);
            drain(&mut t, now);
            t.connected(now, 5, other, addr(2), we_dial);
            drain(&mut t, now);
            t.declare(now, other);
            drain(&mut t, now);
            assert!(!t.listed(&other));
            assert_eq!(t.declared_total(), 1);
            assert_eq!(t.poll_timeout(), Some(now + DECLARED_FOR));
            // Tried again, not listed meanwhile.
            let at = now + DECLARED_FOR;
            let acts = drain(&mut t, at);
            assert!(acts.contains(&Action::Dial(addr(2))), "{acts:?}");
            assert!(!t.listed(&other), "listed before any connection");
            // Still dead: declared again at once, the same death counted once.
            t.dial_failed(at, addr(2), 0.5);
            drain(&mut t, at);
            assert!(!t.listed(&other));
            assert_eq!(t.declared_total(), 1);
            t.set_live(at, &[(other, addr(2))]);
            assert!(!t.listed(&other));
            assert_eq!(drain(&mut t, at + DECLARED_FOR / 2), vec![]);
            // The next try connects: a member again.
            let at = at + DECLARED_FOR;
            t.set_live(at, &[(other, addr(2))]);
            let acts = drain(&mut t, at);
            assert!(acts.contains(&Action::Dial(addr(2))), "{acts:?}");
            assert!(!t.listed(&other));
            t.connected(at, 6, other, addr(2), true);
            assert!(t.listed(&other), "we_dial: {we_dial}");
        }
    }

    #[test]
    fn declaring_an_old_incarnation_keeps_its_address_for_the_new_one() {
        let (mut t, low, old, now) = connected_member();
        drain(&mut t, now);
        // Restarted in place with a new id (higher than us, so we dial it).
        let new = loop {
            let n = Sid::new();
            if PeerTable::is_canonical(low, n) {
                break n;
            }
        };
        t.set_live(now, &[(old, addr(2)), (new, addr(2))]);
        t.declare(now, old);
        let acts = drain(&mut t, now);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::StopDialing { .. })),
            "{acts:?}"
        );
        assert!(
            acts.contains(&Action::Dial(addr(2))),
            "the new one is dialed: {acts:?}"
        );
        assert!(t.listed(&new) && !t.listed(&old));
    }

    #[test]
    fn a_member_never_reached_is_declared_after_a_few_failed_dials() {
        let (low, high) = ids();
        let now = Instant::now();
        let mut t = table(low);
        t.set_live(now, &[(high, addr(2))]);
        for i in 1..=NEVER_REACHED_TRIES {
            let at = now + GRACE * i;
            assert!(t.listed(&high), "listed before try {i}");
            assert_eq!(drain(&mut t, at), vec![Action::Dial(addr(2))]);
            t.dial_failed(at, addr(2), 0.5);
        }
        assert!(!t.listed(&high));
        assert!(drain(&mut t, now + GRACE * 10).contains(&Action::StopDialing { addr: addr(2) }));
    }

    #[test]
    fn a_suspicion_dials_a_member_we_cannot_probe_and_a_failure_declares_it() {
        let (low, high) = ids();
        let now = Instant::now();
        let mut t = table(low);
        t.set_live(now, &[(high, addr(2))]);
        assert_eq!(drain(&mut t, now), vec![Action::Dial(addr(2))]);
        t.dial_failed(now, addr(2), 0.5);
        assert!(
            t.listed(&high),
            "one failure is not enough for a member never reached"
        );
        t.check(now, &high);
        assert_eq!(
            drain(&mut t, now),
            vec![Action::Dial(addr(2))],
            "suspected: dialed now"
        );
        t.dial_failed(now, addr(2), 0.5);
        assert!(!t.listed(&high), "suspected and unreachable: declared");
        let (mut t, _, high, now) = connected_member();
        t.check(now, &high);
        assert!(t.listed(&high), "connected: its probes decide");
        drain(&mut t, now);
        t.disconnected(now, 5);
        drain(&mut t, now);
        t.check(now + 200 * MS, &high);
        assert!(drain(&mut t, now + 200 * MS).contains(&Action::Dial(addr(2))));
    }

    #[test]
    fn failed_dials_back_off_exponentially() {
        let (low, high) = ids();
        let t0 = Instant::now();
        let mut t = table(low);
        t.set_live(t0, &[(high, addr(2))]);
        assert_eq!(drain(&mut t, t0), vec![Action::Dial(addr(2))]);
        t.dial_failed(t0, addr(2), 0.5);
        assert_eq!(drain(&mut t, t0 + 99 * MS), vec![]);
        assert_eq!(t.poll_timeout(), Some(t0 + 100 * MS));
        assert_eq!(drain(&mut t, t0 + 100 * MS), vec![Action::Dial(addr(2))]);
        t.dial_failed(t0 + 100 * MS, addr(2), 0.5);
        assert_eq!(t.poll_timeout(), Some(t0 + 300 * MS));
        // Capped at max.
        let b = Backoff {
            min: 100 * MS,
            max: 1000 * MS,
        };
        assert_eq!(b.delay(30, 0.5), 1000 * MS);
        assert_eq!(b.delay(1, 0.0), 75 * MS);
        assert_eq!(b.delay(1, 0.999), Duration::from_secs_f64(0.1 * 1.2495));
    }

    #[test]
    fn death_closes_connections_and_forgets() {
        let (mut t, _, high, now) = connected_member();
        drain(&mut t, now);
        t.set_live(now, &[]);
        assert_eq!(
            drain(&mut t, now),
            vec![
                Action::StopDialing { addr: addr(2) },
                Action::Close {
                    conn: 5,
                    code: CloseCode::PeerDead
                },
                Action::Forget { node: high }
            ]
        );
        assert_eq!(t.route(high), None);
    }

    #[test]
    fn gossip_does_not_dial_a_dead_member_until_it_comes_back() {
        let (mut t, low, high, now) = connected_member();
        t.set_live(now, &[]);
        drain(&mut t, now);
        // Chitchat gossips to dead members for their grace period: no dial for that.
        for i in 1..100 {
            assert!(!t.want_for_gossip(now + i * 100 * MS, addr(2)));
        }
        assert_eq!(drain(&mut t, now + 10_000 * MS), vec![]);
        // A seed source may still name it: seeds are dialed.
        t.want(now, addr(2));
        assert_eq!(drain(&mut t, now), vec![Action::Dial(addr(2))]);
        t.dial_failed(now, addr(2), 0.5);
        // A failed dial to a dead member's address is not retried on its own.
        assert_eq!(drain(&mut t, now + 60_000 * MS), vec![]);
        // It comes back (it dials us): gossip may dial it again later.
        t.connected(now, 6, high, addr(2), false);
        t.set_live(now, &[(high, addr(2))]);
        drain(&mut t, now);
        assert!(t.want_for_gossip(now, addr(2)));
        // Long dead addresses are dialed again (an address reused by a new node).
        let mut t = table(low);
        t.set_live(now, &[(high, addr(3))]);
        t.set_live(now, &[]);
        assert!(t.want_for_gossip(now + DEAD_ADDR_MEMORY, addr(3)));
    }

    #[test]
    fn dials_in_progress_are_capped() {
        let (low, _) = ids();
        let now = Instant::now();
        let mut t = PeerTable::new(
            low,
            addr(1),
            Backoff {
                min: 100 * MS,
                max: 1000 * MS,
            },
            64,
            GRACE,
        );
        // A fleet starts together: many members to dial at once.
        for port in 100..130 {
            t.want(now, addr(port));
        }
        let first = drain(&mut t, now);
        assert_eq!(first.len(), MAX_CONCURRENT_DIALS, "{first:?}");
        assert_eq!(
            t.poll_timeout(),
            None,
            "at the cap, only an ended dial wakes the table"
        );
        // Each dial that ends lets one more start.
        let Action::Dial(done) = first[0] else {
            panic!("{first:?}")
        };
        t.dial_failed(now, done, 0.5);
        assert_eq!(drain(&mut t, now).len(), 1);
        let mut started = MAX_CONCURRENT_DIALS + 1;
        for (i, a) in first.iter().skip(1).enumerate() {
            let Action::Dial(addr) = a else { continue };
            t.connected(now, i as u64 + 10, Sid::new(), *addr, true);
            started += drain(&mut t, now)
                .iter()
                .filter(|a| matches!(a, Action::Dial(_)))
                .count();
        }
        assert_eq!(started, 2 * MAX_CONCURRENT_DIALS);
    }

    #[test]
    fn a_seed_that_is_not_listening_yet_is_retried_quickly() {
        let (low, _) = ids();
        let now = Instant::now();
        let mut t = table(low);
        t.want(now, addr(7));
        assert_eq!(drain(&mut t, now), vec![Action::Dial(addr(7))]);
        let mut at = now;
        for _ in 0..BARE_ADDR_RETRIES {
            t.dial_failed(at, addr(7), 0.5);
            let next = t.poll_timeout().expect("a retry is scheduled");
            assert!(
                next - at <= 1000 * MS,
                "retried within the backoff, not the seed round"
            );
            at = next;
            assert_eq!(drain(&mut t, at), vec![Action::Dial(addr(7))]);
        }
        // Then it waits to be wanted again (next seed round).
        t.dial_failed(at, addr(7), 0.5);
        assert_eq!(drain(&mut t, at + 60_000 * MS), vec![]);
    }

    #[test]
    fn lost_connection_to_live_member_is_redialed() {
        let (mut t, _, high, now) = connected_member();
        drain(&mut t, now);
        t.disconnected(now, 5);
        assert_eq!(
            drain(&mut t, now),
            vec![Action::Route {
                node: high,
                conn: None
            }]
        );
        assert_eq!(drain(&mut t, now + 100 * MS), vec![Action::Dial(addr(2))]);
    }

    #[test]
    fn newest_canonical_replaces_older_on_the_acceptor() {
        let (low, high) = ids();
        let now = Instant::now();
        let mut t = table(high);
        t.connected(now, 1, low, addr(2), false);
        drain(&mut t, now);
        t.connected(now, 2, low, addr(2), false);
        assert_eq!(
            drain(&mut t, now),
            vec![
                Action::Close {
                    conn: 1,
                    code: CloseCode::Replaced
                },
                Action::Route {
                    node: low,
                    conn: Some(2)
                }
            ]
        );
        // The replaced connection closing later changes nothing.
        t.disconnected(now, 1);
        assert_eq!(drain(&mut t, now), vec![]);
        assert_eq!(t.route(low), Some(2));
    }

    #[test]
    fn wanted_addresses_are_bounded_and_skip_self_and_connected() {
        let (low, high) = ids();
        let now = Instant::now();
        let mut t = table(low);
        t.want(now, addr(1)); // ourselves
        assert_eq!(drain(&mut t, now), vec![]);
        for port in 100..200 {
            t.want(now, addr(port));
        }
        let dials = drain(&mut t, now);
        assert_eq!(dials.len(), 8);
        assert!(t.num_addrs() <= 8);
        t.connected(now, 9, high, addr(150), true);
        t.want(now, addr(150));
        assert!(!drain(&mut t, now).contains(&Action::Dial(addr(150))));
    }

    /// Gossip wants the address of a member before either side connected; the member dials
    /// first (it is the lower id), and our dial is refused as `Replaced`. It is not retried:
    /// it would be refused every time (this loop once cost 5 dials per pair at idle).
    #[test]
    fn a_crossing_dial_refused_is_not_retried() {
        let (low, high) = ids();
        let now = Instant::now();
        let mut t = table(high);
        t.set_live(now, &[(low, addr(2))]);
        t.want(now, addr(2));
        assert_eq!(drain(&mut t, now), vec![Action::Dial(addr(2))]);
        // The member's dial arrives first: the canonical connection.
        t.connected(now, 1, low, addr(2), false);
        assert_eq!(
            drain(&mut t, now),
            vec![Action::Route {
                node: low,
                conn: Some(1)
            }]
        );
        // Ours is refused.
        t.dial_failed(now, addr(2), 0.5);
        for later in [0, 100, 1_000, 10_000] {
            assert_eq!(drain(&mut t, now + later * MS), vec![], "{later} ms");
        }
        assert_eq!(t.route(low), Some(1));
        // The same when ours fails before theirs arrives.
        let mut t = table(high);
        t.set_live(now, &[(low, addr(2))]);
        t.want(now, addr(2));
        drain(&mut t, now);
        t.dial_failed(now, addr(2), 0.5);
        t.connected(now, 1, low, addr(2), false);
        drain(&mut t, now);
        for later in [0, 100, 1_000, 10_000] {
            assert_eq!(drain(&mut t, now + later * MS), vec![], "{later} ms");
        }
    }

    #[test]
    fn restart_at_the_same_address_does_not_redial_for_the_old_incarnation() {
        let (low, _) = ids();
        // Two higher ids: the old incarnation and the restarted node, same address.
        let (mut old, mut new) = (Sid::new(), Sid::new());
        while !PeerTable::is_canonical(low, old) {
            old = Sid::new();
        }
        while !PeerTable::is_canonical(low, new) {
            new = Sid::new();
        }
        let now = Instant::now();
        let mut t = table(low);
        t.set_live(now, &[(old, addr(2))]);
        assert_eq!(drain(&mut t, now), vec![Action::Dial(addr(2))]);
        // The address now answers as the new incarnation.
        t.connected(now, 1, new, addr(2), true);
        drain(&mut t, now);
        // Gossip still lists the old one as live for a while: no dial loop for it.
        t.set_live(now, &[(old, addr(2)), (new, addr(2))]);
        assert_eq!(drain(&mut t, now + 10 * MS), vec![]);
        assert_eq!(drain(&mut t, now + 1000 * MS), vec![]);
        // Once declared dead it is forgotten; the new one keeps its connection.
        t.set_live(now, &[(new, addr(2))]);
        assert_eq!(drain(&mut t, now), vec![Action::Forget { node: old }]);
        assert_eq!(t.route(new), Some(1));
    }

    #[test]
    fn unknown_peer_forgotten_when_its_only_connection_closes() {
        let (low, high) = ids();
        let now = Instant::now();
        let mut t = table(high);
        t.connected(now, 1, low, addr(2), false);
        drain(&mut t, now);
        t.disconnected(now, 1);
        assert_eq!(
            drain(&mut t, now),
            vec![
                Action::Route {
                    node: low,
                    conn: None
                },
                Action::Forget { node: low }
            ]
        );
    }
}
