//! The driver: one task that owns the [`PeerTable`] and turns its actions into dials, closes
//! and link updates, routes gossip to connections, and feeds membership and seeds in.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use socketioxide_core::Uid;
use tokio::{
    sync::mpsc,
    time::{Instant, sleep_until},
};
use tracing::{Instrument, debug, info, trace, warn};

use super::{Routes, Shared, Side, conn, link::Link};
use crate::incidents::{Incident, SUMMARY_EVERY};
use crate::{
    MeshConfig,
    membership::{Member, keys},
    peers::{Action, Backoff, ConnId, NodeId, PeerTable},
    probe::{Out as ProbeOut, Prober},
    transport::{CloseCode, Conn, TransportError},
    wire::{Hello, Probe},
};

/// Addresses tracked for dialing at most (seeds, gossip targets, members).
const MAX_DIAL_ADDRS: usize = 1024;
/// How often the local socket count is published in gossip (observability).
const LOAD_INTERVAL: Duration = Duration::from_secs(5);

enum Event {
    Connected {
        conn: Conn,
        peer: Hello,
        /// The address we dialed, when we dialed.
        dialed: Option<SocketAddr>,
    },
    DialFailed {
        addr: SocketAddr,
        error: String,
    },
    Disconnected {
        conn: ConnId,
        error: TransportError,
    },
}

/// How long after a change of this node's published state it is pushed to the peers: changes
/// made together (a namespace and the server id) go in one exchange.
const PUSH_DELAY: Duration = Duration::from_millis(20);

struct ConnEntry {
    conn: Conn,
    node: NodeId,
    addr: SocketAddr,
    gossip_tx: mpsc::Sender<Bytes>,
}

struct Driver {
    shared: Arc<Shared>,
    table: PeerTable,
    conns: HashMap<ConnId, ConnEntry>,
    /// Advertised address → connection carrying gossip to it.
    gossip_routes: HashMap<SocketAddr, ConnId>,
    /// Nodes that said goodbye: ignored even if gossip still lists them for a moment.
    departed: HashSet<NodeId>,
    /// The members gossip lists, as last read.
    gossip: Vec<Member>,
    /// The members gossip lists (without those that said goodbye, and without those its
    /// failure detector declared dead unless a connection that answers probes says
    /// otherwise), by address.
    candidates: Vec<Member>,
    /// Candidates we were introduced to (a gossip exchange asked for), so that a node with a
    /// lower id learns of us at once and dials us.
    greeted: HashSet<NodeId>,
    /// The live members, as last published: the candidates the peer table lists.
    members: Vec<Member>,
    /// Membership or a link changed since the members were last published.
    dirty: bool,
    /// When this node's own changes are pushed to its peers.
    push_at: Option<Instant>,
    prober: Prober,
    /// One member pinged per period (see [`crate::probe`]).
    probe_interval: Duration,
    events_tx: mpsc::Sender<Event>,
    /// Where joining the mesh stands (for readiness).
    join: Join,
}

/// Joining the mesh, as readiness sees it.
#[derive(Debug)]
enum Join {
    /// Waiting for the first seed round that a source answered.
    Seeds,
    /// Dialing the first round's seeds: done when one connects (and gossip lists members), or
    /// when every one of them failed (this node is alone).
    Dialing {
        pending: HashSet<SocketAddr>,
        connected: bool,
    },
    Done,
}

/// One round of the seed sources.
pub(super) struct SeedRound {
    addrs: Vec<SocketAddr>,
    /// Whether at least one source answered (an empty answer counts).
    answered: bool,
}

pub(super) async fn spawn(
    shared: Arc<Shared>,
    cfg: &MeshConfig,
    gossip_out: mpsc::Receiver<(SocketAddr, Bytes)>,
    probes: mpsc::Receiver<(NodeId, Probe)>,
) {
    let (events_tx, events_rx) = mpsc::channel(256);
    let table = PeerTable::new(
        shared.node_key,
        shared.hello.advertise_addr,
        Backoff {
            min: cfg.reconnect_min,
            max: cfg.reconnect_max,
        },
        MAX_DIAL_ADDRS,
        cfg.link_grace,
    );
    let live = shared.membership.live_watcher().await;
    let (seeds_tx, seeds_rx) = mpsc::channel(16);
    let driver = Driver {
        shared: shared.clone(),
        table,
        conns: HashMap::new(),
        gossip_routes: HashMap::new(),
        departed: HashSet::new(),
        gossip: Vec::new(),
        candidates: Vec::new(),
        greeted: HashSet::new(),
        members: Vec::new(),
        dirty: false,
        push_at: None,
        prober: Prober::new(cfg.probe_timeout),
        probe_interval: cfg.probe_interval,
        events_tx: events_tx.clone(),
        join: if shared.seeds.is_empty() {
            Join::Done
        } else {
            Join::Seeds
        },
    };
    // Every task of this node logs under its id, so the logs of several nodes in one process
    // (tests, benchmarks) say which node speaks.
    let span = tracing::debug_span!("mesh", node = %shared.node_id);
    shared
        .tasks
        .spawn(accept_loop(shared.clone(), events_tx).instrument(span.clone()));
    shared
        .tasks
        .spawn(seed_loop(shared.clone(), cfg.seed_interval, seeds_tx));
    shared.tasks.spawn(load_loop(shared.clone()));
    shared.tasks.spawn(summary_loop(shared.clone()));
    shared.tasks.spawn(metrics_loop(shared.clone()));
    if let Some(every) = cfg.tls_reload {
        shared
            .tasks
            .spawn(tls_reload_loop(shared.clone(), cfg.tls.clone(), every));
    }
    shared.tasks.spawn(
        driver
            .run(events_rx, live, gossip_out, seeds_rx, probes)
            .instrument(span),
    );
}

impl Driver {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut live: crate::membership::LiveWatch,
        mut gossip_out: mpsc::Receiver<(SocketAddr, Bytes)>,
        mut seeds: mpsc::Receiver<SeedRound>,
        mut probes: mpsc::Receiver<(NodeId, Probe)>,
    ) {
        let cancel = self.shared.cancel.clone();
        let local_change = self.shared.membership.local_change();
        let mut probe_tick = tokio::time::interval(self.probe_interval);
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.update_ready();
        loop {
            let wake = self
                .table
                .poll_timeout()
                .map(Instant::from_std)
                .into_iter()
                .chain(self.push_at)
                .chain(self.prober.next_deadline().map(Instant::from_std))
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(ev) = events.recv() => self.on_event(ev),
                changed = live.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let view = live.view().await;
                    self.on_members(view);
                }
                Some((addr, frame)) = gossip_out.recv() => self.on_gossip_out(addr, frame),
                Some(round) = seeds.recv() => self.on_seeds(round),
                Some((node, probe)) = probes.recv() => self.on_probe(node, probe),
                due = probe_tick.tick() => {
                    self.prober.note_lag(Instant::now().saturating_duration_since(due));
                    self.read_answers(&mut probes);
                    self.probe_round();
                }
                _ = local_change.notified() => {
                    self.push_at.get_or_insert(Instant::now() + PUSH_DELAY);
                }
                _ = sleep_until(wake) => {}
            }
            self.probe_expire(&mut probes);
            if self.push_at.is_some_and(|at| at <= Instant::now()) {
                self.push_at = None;
                self.push_own_state();
            }
            self.run_actions();
            // Counters first: whoever sees the membership change sees them agree.
            self.shared
                .stats
                .dead_members_now
                .store(self.table.dead_members() as u64, Ordering::Relaxed);
            self.shared
                .stats
                .peers_declared_dead
                .store(self.table.declared_total(), Ordering::Relaxed);
            if std::mem::take(&mut self.dirty) {
                self.publish();
            }
            self.update_ready();
        }
        for entry in self.conns.values() {
            entry.conn.close(CloseCode::Leaving, "node shutting down");
        }
        for link in self.shared.links().values() {
            link.set_gone();
        }
    }

    fn run_actions(&mut self) {
        let now = std::time::Instant::now();
        while let Some(action) = self.table.poll_action(now) {
            match action {
                Action::Dial(addr) => self.dial(addr),
                Action::Close { conn, code } => {
                    if let Some(entry) = self.conns.get(&conn) {
                        debug!(peer = %entry.node, ?code, "closing connection");
                        entry.conn.close(code, close_reason(code));
                    }
                }
                Action::Route { node, conn } => {
                    let conn = conn
                        .and_then(|id| self.conns.get(&id))
                        .map(|e| e.conn.clone());
                    let link = self.ensure_link(node);
                    link.set_conn(conn);
                    self.dirty = true;
                }
                Action::StopDialing { addr } => self.shared.transport.incidents().report(
                    Incident::DeadMember,
                    addr,
                    &"gossip keeps it for its grace period; it dials back if it returns",
                ),
                Action::Forget { node } => {
                    let link = self
                        .shared
                        .links
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&node);
                    let sent = link.as_ref().map(|l| l.next_seq());
                    if let Some(link) = link {
                        link.set_gone();
                        info!(peer = %link.node_uid, "peer dropped from the mesh (left, closed or declared dead)");
                    }
                    self.prober.forget(&node);
                    self.shared.retire(&node, sent);
                    self.dirty = true;
                }
            }
        }
    }

    /// Publish the members: the candidates the peer table lists (not declared dead, not
    /// without a connection past the grace), with their links and routes.
    fn publish(&mut self) {
        let members: Vec<Member> = self
            .candidates
            .iter()
            .filter(|m| self.table.listed(&m.node_id))
            .cloned()
            .collect();
        for m in &members {
            self.ensure_link(*m.node_id);
        }
        self.members = members.clone();
        self.publish_routes();
        let before = self.shared.members_tx.borrow().len();
        if before != members.len() {
            // The same count as `Mesh::members()`: the other nodes, not this one.
            info!(
                members = members.len(),
                before, "mesh membership changed (members: the other live nodes)"
            );
        }
        self.shared.members_tx.send_if_modified(|m| {
            let changed = **m != members;
            if changed {
                *m = Arc::new(members);
            }
            changed
        });
    }

    /// Push this node's published state to every peer it is connected to now (a gossip
    /// exchange each), instead of waiting for the gossip rounds to carry it.
    fn push_own_state(&mut self) {
        let addrs: HashSet<SocketAddr> = self.conns.values().map(|e| e.addr).collect();
        for addr in addrs {
            self.shared.membership.gossip_to(addr);
        }
    }

    /// The members probes go to: those that answer them, over a connection.
    fn probe_targets(&self) -> Vec<NodeId> {
        let links = self.shared.links();
        self.members
            .iter()
            .filter(|m| m.probe)
            .map(|m| *m.node_id)
            .filter(|n| Self::connected(&links, n))
            .collect()
    }

    /// Whether `node`'s link has a connection now.
    fn connected(links: &HashMap<NodeId, Arc<Link>>, node: &NodeId) -> bool {
        links
            .get(node)
            .is_some_and(|l| l.state.borrow().conn.is_some())
    }

    /// One probe period (see [`crate::probe`]): act on expired pings, ping the next member.
    fn probe_round(&mut self) {
        let now = std::time::Instant::now();
        let targets = self.probe_targets();
        let out = self.prober.tick(now, &targets, fastrand::shuffle);
        for o in out {
            self.probe_out(now, o);
        }
    }

    /// Take in the answers received already, before judging anyone silent: the timer that
    /// ends a ping's wait and its answer may be ready at the same moment (a busy node wakes
    /// late with both), and the answer must win.
    fn read_answers(&mut self, probes: &mut mpsc::Receiver<(NodeId, Probe)>) {
        while let Ok((node, probe)) = probes.try_recv() {
            self.on_probe(node, probe);
        }
    }

    /// Act on pings past their deadline, between periods (the answers received already
    /// first).
    fn probe_expire(&mut self, probes: &mut mpsc::Receiver<(NodeId, Probe)>) {
        let now = std::time::Instant::now();
        if self.prober.next_deadline().is_none_or(|d| d > now) {
            return;
        }
        self.read_answers(probes);
        let targets = self.probe_targets();
        for o in self.prober.expire(now, &targets) {
            self.probe_out(now, o);
        }
    }

    fn probe_out(&mut self, now: std::time::Instant, out: ProbeOut) {
        match out {
            ProbeOut::Ping { node, nonce } => {
                trace!(peer = %node, nonce, timeout = ?self.prober.current_timeout(), "ping");
                if let Some(link) = self.shared.links().get(&node).cloned() {
                    self.shared.send_probe(&[link], &Probe::Ping(nonce));
                }
            }
            ProbeOut::Suspect { node } => {
                let uid = Uid::from_str(node.as_str()).unwrap_or_default();
                debug!(peer = %uid, timeout = ?self.prober.current_timeout(), "probe unanswered: peer suspected, asking the others to check");
                self.shared
                    .stats
                    .probes_unanswered
                    .fetch_add(1, Ordering::Relaxed);
                let links = self.shared.links();
                let others: Vec<Arc<Link>> = self
                    .members
                    .iter()
                    .filter(|m| m.probe && *m.node_id != node)
                    .filter_map(|m| links.get(&*m.node_id).cloned())
                    .collect();
                drop(links);
                let word = Probe::Suspect(node.as_str().to_string().into());
                self.shared.send_probe(&others, &word);
            }
            ProbeOut::Declare { node } => {
                let uid = Uid::from_str(node.as_str()).unwrap_or_default();
                warn!(peer = %uid, timeout = ?self.prober.current_timeout(), "peer declared dead: probes unanswered");
                self.table.declare(now, node);
            }
        }
    }

    /// A pong or a suspicion from `from`.
    fn on_probe(&mut self, from: NodeId, probe: Probe) {
        let now = std::time::Instant::now();
        match probe {
            Probe::Pong(nonce) => self.prober.on_pong(now, from, nonce),
            Probe::Suspect(node) => {
                let Ok(uid) = Uid::from_str(&node) else {
                    debug!(peer = %from, "suspicion of a malformed node id ignored");
                    return;
                };
                let node = *uid;
                if node == self.shared.node_key {
                    // Suspected ourselves: our answers are late. Nothing to check here.
                    return;
                }
                let probed = Self::connected(&self.shared.links(), &node)
                    && self.members.iter().any(|m| *m.node_id == node && m.probe);
                if probed {
                    if let Some(out) = self.prober.on_suspect(now, node) {
                        self.probe_out(now, out);
                    }
                } else {
                    // No connection to probe it on: a dial decides.
                    self.table.check(now, &node);
                }
            }
            Probe::Ping(_) => {}
        }
    }

    /// Publish where commands and requests go: the links of the live members.
    fn publish_routes(&self) {
        let links = self.shared.links();
        let routes = self
            .members
            .iter()
            .filter_map(|m| {
                let link = links.get(&*m.node_id)?;
                (!link.state.borrow().gone).then(|| (link.clone(), m.server_id, m.interest))
            })
            .collect();
        drop(links);
        self.shared.routes.store(Arc::new(Routes::new(routes)));
    }

    fn ensure_link(&self, node: NodeId) -> Arc<Link> {
        let mut links = self.shared.links.write().unwrap_or_else(|e| e.into_inner());
        links
            .entry(node)
            .or_insert_with(|| {
                let uid = Uid::from_str(node.as_str()).unwrap_or_default();
                // A node that comes back continues its numbering (see `Retired`).
                let first_seq = self
                    .shared
                    .retired
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(Side::Sent, &node, std::time::Instant::now())
                    .unwrap_or(0);
                Link::spawn(
                    node,
                    uid,
                    self.shared.settings.link_limits,
                    first_seq,
                    self.shared.stats.clone(),
                    self.shared.transport.incidents().clone(),
                    &self.shared.tasks,
                    self.shared.cancel.clone(),
                )
            })
            .clone()
    }

    fn dial(&self, addr: SocketAddr) {
        trace!(%addr, "dialing");
        let shared = self.shared.clone();
        let tx = self.events_tx.clone();
        let task = async move {
            let ev = match conn::dial(&shared, addr).await {
                Ok((conn, peer)) => Event::Connected {
                    conn,
                    peer,
                    dialed: Some(addr),
                },
                Err(e) => {
                    match conn::incident_of(&e, true) {
                        Some(incident) => shared.transport.incidents().report(incident, addr, &e),
                        None => debug!(%addr, error = %e, "dial failed"),
                    }
                    Event::DialFailed {
                        addr,
                        error: e.to_string(),
                    }
                }
            };
            // The driver may be gone (shutdown).
            let _ = tx.send(ev).await;
        };
        self.shared.tasks.spawn(task.in_current_span());
    }

    fn on_seeds(&mut self, round: SeedRound) {
        let now = std::time::Instant::now();
        if matches!(self.join, Join::Seeds) && round.answered {
            let me = [self.shared.hello.advertise_addr, self.shared.local_addr];
            let pending: HashSet<SocketAddr> = round
                .addrs
                .iter()
                .copied()
                .filter(|a| !me.contains(a))
                .collect();
            self.join = if pending.is_empty() {
                Join::Done
            } else {
                Join::Dialing {
                    pending,
                    connected: false,
                }
            };
        }
        for addr in round.addrs {
            self.table.want(now, addr);
        }
    }

    /// Ready: joined (see [`Join`]) and a connection to every live member.
    fn update_ready(&mut self) {
        if let Join::Dialing { pending, connected } = &self.join
            && ((*connected && !self.members.is_empty()) || pending.is_empty())
        {
            self.join = Join::Done;
        }
        let ready = matches!(self.join, Join::Done) && {
            let links = self.shared.links();
            self.members.iter().all(|m| {
                links
                    .get(&*m.node_id)
                    .is_some_and(|l| l.state.borrow().conn.is_some())
            })
        };
        self.shared.ready_tx.send_if_modified(|r| {
            let changed = *r != ready;
            *r = ready;
            changed
        });
    }

    fn on_event(&mut self, ev: Event) {
        let now = std::time::Instant::now();
        match ev {
            Event::Connected { conn, peer, dialed } => {
                if let Join::Dialing { connected, .. } = &mut self.join {
                    *connected = true;
                }
                let node = *peer.node_id;
                if self.departed.contains(&node) || self.shared.cancel.is_cancelled() {
                    conn.close(CloseCode::Leaving, "peer already left");
                    return;
                }
                let id = conn.id();
                debug!(peer = %peer.node_id, addr = %peer.advertise_addr, dialed = dialed.is_some(), "peer connected");
                let (gossip_tx, gossip_rx) = mpsc::channel(conn::GOSSIP_QUEUE);
                self.conns.insert(
                    id,
                    ConnEntry {
                        conn: conn.clone(),
                        node,
                        addr: peer.advertise_addr,
                        gossip_tx,
                    },
                );
                self.gossip_routes.insert(peer.advertise_addr, id);
                if let Some(dial_addr) = dialed
                    && dial_addr != peer.advertise_addr
                {
                    // We dialed an address the peer does not advertise (a seed behind a name):
                    // route gossip for that address too.
                    self.gossip_routes.insert(dial_addr, id);
                }
                self.table
                    .connected(now, id, node, peer.advertise_addr, dialed.is_some());
                let shared = self.shared.clone();
                let tx = self.events_tx.clone();
                let serve = async move {
                    let error = conn::serve(shared, conn, peer, gossip_rx).await;
                    let _ = tx.send(Event::Disconnected { conn: id, error }).await;
                };
                self.shared.tasks.spawn(serve.in_current_span());
                // Gossip right away on the new connection: joining takes one round trip.
                self.shared.membership.gossip_to(self.conn_addr(id));
            }
            Event::DialFailed { addr, error } => {
                if let Join::Dialing { pending, .. } = &mut self.join {
                    pending.remove(&addr);
                }
                self.shared
                    .stats
                    .dials_failed
                    .fetch_add(1, Ordering::Relaxed);
                let _ = error;
                self.table.dial_failed(now, addr, fastrand::f64());
            }
            Event::Disconnected { conn, error } => {
                let Some(entry) = self.conns.remove(&conn) else {
                    return;
                };
                self.gossip_routes.retain(|_, c| *c != conn);
                // Re-route gossip through another connection to the same node, if any.
                if let Some((other, e)) = self.conns.iter().find(|(_, e)| e.node == entry.node) {
                    self.gossip_routes.insert(e.addr, *other);
                }
                if let TransportError::Closed {
                    code: Some(CloseCode::Leaving),
                    ..
                } = error
                {
                    info!(peer = %entry.node, "peer is leaving");
                    self.departed.insert(entry.node);
                    self.table.departed(now, entry.node);
                    self.candidates.retain(|m| *m.node_id != entry.node);
                    self.dirty = true;
                } else {
                    debug!(peer = %entry.node, %error, "peer connection closed");
                }
                self.table.disconnected(now, conn);
                if self
                    .gossip
                    .iter()
                    .any(|m| m.gossip_dead && *m.node_id == entry.node)
                {
                    // Only its connection kept it: gossip's verdict stands now.
                    self.update_candidates();
                }
            }
        }
    }

    fn conn_addr(&self, id: ConnId) -> SocketAddr {
        self.conns
            .get(&id)
            .map(|e| e.addr)
            .unwrap_or(self.shared.hello.advertise_addr)
    }

    fn on_members(&mut self, live: crate::membership::LiveView) {
        // Forget departed nodes once gossip forgot them too (bounded memory).
        let listed: HashSet<NodeId> = live.listed.iter().map(|u| **u).collect();
        self.departed.retain(|n| listed.contains(n));
        self.gossip = live.members;
        self.update_candidates();
    }

    /// Recompute the candidates from gossip's view and the connections, and tell the table.
    fn update_candidates(&mut self) {
        let mut candidates: Vec<Member> = self
            .gossip
            .iter()
            .filter(|m| !self.departed.contains(&*m.node_id))
            .filter(|m| !m.gossip_dead || (m.probe && self.table.has_canonical(&m.node_id)))
            .cloned()
            .collect();
        candidates.sort_by_key(|m| m.addr);

        let pairs: Vec<(NodeId, SocketAddr)> =
            candidates.iter().map(|m| (*m.node_id, m.addr)).collect();
        self.table.set_live(std::time::Instant::now(), &pairs);
        // A new member with a lower id dials us only once it knows us: introduce ourselves
        // with a gossip exchange now rather than at some later round.
        self.greeted
            .retain(|n| candidates.iter().any(|m| *m.node_id == *n));
        for m in &candidates {
            let node = *m.node_id;
            if PeerTable::is_canonical(node, self.shared.node_key)
                && self.greeted.insert(node)
                && !self.conns.values().any(|e| e.node == node)
            {
                self.shared.membership.gossip_to(m.addr);
            }
        }
        self.candidates = candidates;
        // Published after the table's actions (deaths included) ran, in the driver's loop,
        // so watchers see links and members agree.
        self.dirty = true;
    }

    fn on_gossip_out(&mut self, addr: SocketAddr, frame: Bytes) {
        match self
            .gossip_routes
            .get(&addr)
            .and_then(|id| self.conns.get(id))
        {
            Some(entry) => {
                let len = frame.len() as u64;
                if entry.gossip_tx.try_send(frame).is_err() {
                    debug!(%addr, "gossip queue of connection full, message dropped");
                } else {
                    self.shared
                        .stats
                        .gossip_bytes_sent
                        .fetch_add(len, Ordering::Relaxed);
                }
            }
            None => {
                if !self.table.want_for_gossip(std::time::Instant::now(), addr) {
                    trace!(%addr, "no gossip to a dead member's address");
                }
            }
        }
    }
}

fn close_reason(code: CloseCode) -> &'static str {
    match code {
        CloseCode::Leaving => "node leaving",
        CloseCode::Protocol => "protocol violation",
        CloseCode::Refused => "handshake refused",
        CloseCode::SlowPeer => "slow peer cut off",
        CloseCode::Replaced => "replaced by another connection",
        CloseCode::PeerDead => "peer declared dead",
    }
}

/// Accepts connections and runs their handshakes concurrently (bounded).
async fn accept_loop(shared: Arc<Shared>, events: mpsc::Sender<Event>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    loop {
        let conn = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            conn = shared.transport.accept() => conn,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(TransportError::EndpointClosed) => return,
            Err(e) => {
                debug!(error = %e, "accept failed");
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!(remote = %conn.remote_addr(), "too many handshakes in progress, refusing connection");
            conn.close(CloseCode::Refused, "busy");
            continue;
        };
        let (shared2, events) = (shared.clone(), events.clone());
        let handshake = async move {
            let _permit = permit;
            if let Ok(peer) = conn::accept(&shared2, &conn).await {
                let _ = events
                    .send(Event::Connected {
                        conn,
                        peer,
                        dialed: None,
                    })
                    .await;
            }
        };
        shared.tasks.spawn(handshake.in_current_span());
    }
}

/// Asks every seed source periodically and hands the addresses to the driver.
async fn seed_loop(shared: Arc<Shared>, interval: Duration, tx: mpsc::Sender<SeedRound>) {
    if shared.seeds.is_empty() {
        return;
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mut addrs = Vec::new();
        let mut answered = false;
        for source in &shared.seeds {
            let ctx = shared.seed_ctx.clone();
            match tokio::time::timeout(interval.max(Duration::from_secs(2)), source.seeds(&ctx))
                .await
            {
                Ok(Ok(found)) => {
                    answered = true;
                    addrs.extend(found)
                }
                Ok(Err(e)) => warn!(source = source.name(), error = %e, "seed source failed"),
                Err(_) => warn!(source = source.name(), "seed source timed out"),
            }
        }
        addrs.sort();
        addrs.dedup();
        if tx.send(SeedRound { addrs, answered }).await.is_err() {
            return;
        }
    }
}

/// Publishes the number of local sockets in gossip, for observability.
/// Says what the incident log held back, every [`SUMMARY_EVERY`].
async fn summary_loop(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(SUMMARY_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = ticker.tick() => shared.transport.incidents().summarize(),
        }
    }
}

/// Copies the counters to the `metrics` recorder every [`telemetry::PUBLISH_EVERY`].
async fn metrics_loop(shared: Arc<Shared>) {
    crate::telemetry::describe();
    let mut ticker = tokio::time::interval(crate::telemetry::PUBLISH_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        shared.record_metrics(&shared.snapshot());
    }
}

async fn load_loop(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(LOAD_INTERVAL);
    let mut last = None;
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let handlers: Vec<_> = shared
            .namespaces
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        let n: usize = handlers.iter().map(|h| h.num_sockets()).sum();
        if last != Some(n) {
            shared.membership.set(keys::SOCKETS, &n.to_string()).await;
            last = Some(n);
        }
    }
}

/// Watches the TLS files and hands new material to the transport when they change.
async fn tls_reload_loop(shared: Arc<Shared>, tls: crate::TlsConfig, every: Duration) {
    let mut seen = tls.files_modified();
    if seen.is_none() {
        return; // not read from files: nothing to watch
    }
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let modified = tls.files_modified();
        if modified == seen {
            continue;
        }
        // Whatever happens, do not retry until the files change again (no log flood while a
        // half-written file sits there).
        seen = modified;
        match tls.reload() {
            Some(Ok(new)) => match shared.transport.reload_tls(&new) {
                Ok(()) => match new.check_own_certificate() {
                    Ok(()) => info!("TLS files changed: new connections use the new certificates"),
                    Err(e) => warn!(
                        error = %e,
                        "TLS files changed: new connections use them, but peers will refuse this certificate"
                    ),
                },
                Err(e) => {
                    warn!(error = %e, "TLS files changed but cannot be used: keeping the current ones")
                }
            },
            Some(Err(e)) => {
                warn!(error = %e, "TLS files changed but cannot be loaded: keeping the current ones")
            }
            None => return,
        }
    }
}
