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
use tracing::{debug, info, trace, warn};

use super::{Routes, Shared, Side, conn, link::Link};
use crate::incidents::{Incident, SUMMARY_EVERY};
use crate::{
    MeshConfig,
    membership::{Member, keys},
    peers::{Action, Backoff, ConnId, NodeId, PeerTable},
    transport::{CloseCode, Conn, TransportError},
    wire::Hello,
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
    /// The live members, as last published.
    members: Vec<Member>,
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
    );
    let live = shared.membership.live_watcher().await;
    let (seeds_tx, seeds_rx) = mpsc::channel(16);
    let driver = Driver {
        shared: shared.clone(),
        table,
        conns: HashMap::new(),
        gossip_routes: HashMap::new(),
        departed: HashSet::new(),
        members: Vec::new(),
        events_tx: events_tx.clone(),
        join: if shared.seeds.is_empty() {
            Join::Done
        } else {
            Join::Seeds
        },
    };
    shared.tasks.spawn(accept_loop(shared.clone(), events_tx));
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
    shared
        .tasks
        .spawn(driver.run(events_rx, live, gossip_out, seeds_rx));
}

impl Driver {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut live: crate::membership::LiveWatch,
        mut gossip_out: mpsc::Receiver<(SocketAddr, Bytes)>,
        mut seeds: mpsc::Receiver<SeedRound>,
    ) {
        let cancel = self.shared.cancel.clone();
        self.update_ready();
        loop {
            let wake = self
                .table
                .poll_timeout()
                .map(Instant::from_std)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(ev) = events.recv() => self.on_event(ev),
                changed = live.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let view = live.view();
                    self.on_members(view);
                }
                Some((addr, frame)) = gossip_out.recv() => self.on_gossip_out(addr, frame),
                Some(round) = seeds.recv() => self.on_seeds(round),
                _ = sleep_until(wake) => {}
            }
            self.run_actions();
            self.update_ready();
            self.shared
                .stats
                .dead_members_now
                .store(self.table.dead_members() as u64, Ordering::Relaxed);
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
        let mut forgot = false;
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
                        forgot = true;
                        info!(peer = %link.node_uid, "peer left the mesh");
                    }
                    self.shared.retire(&node, sent);
                }
            }
        }
        if forgot {
            self.publish_routes();
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
        let shared = self.shared.clone();
        let tx = self.events_tx.clone();
        self.shared.tasks.spawn(async move {
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
        });
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
                self.shared.tasks.spawn(async move {
                    let error = conn::serve(shared, conn, peer, gossip_rx).await;
                    let _ = tx.send(Event::Disconnected { conn: id, error }).await;
                });
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
                } else {
                    debug!(peer = %entry.node, %error, "peer connection closed");
                }
                self.table.disconnected(now, conn);
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
        let mut members: Vec<Member> = live
            .members
            .into_iter()
            .filter(|m| !self.departed.contains(&*m.node_id))
            .collect();
        members.sort_by_key(|m| m.addr);
        // Forget departed nodes once gossip forgot them too (bounded memory).
        let listed: HashSet<NodeId> = live.listed.iter().map(|u| **u).collect();
        self.departed.retain(|n| listed.contains(n));

        let pairs: Vec<(NodeId, SocketAddr)> =
            members.iter().map(|m| (*m.node_id, m.addr)).collect();
        self.table.set_live(std::time::Instant::now(), &pairs);
        for m in &members {
            self.ensure_link(*m.node_id);
        }
        self.members = members.clone();
        // Apply deaths before publishing, so watchers see links and members agree.
        self.run_actions();
        self.publish_routes();
        let before = self.shared.members_tx.borrow().len();
        if before != members.len() {
            // The same count as `Mesh::members()`: the other nodes, not this one.
            info!(
                members = members.len(),
                before, "mesh membership changed (members: the other live nodes)"
            );
        }
        self.shared.members_tx.send_replace(Arc::new(members));
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
        shared.tasks.spawn(async move {
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
        });
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
