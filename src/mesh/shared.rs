//! The state shared by the [`Mesh`](super::Mesh) handles, the adapters and the tasks, and
//! what it does: apply peers' commands, queue commands to links, count, retire forgotten
//! nodes, hand server events to the handler.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock, RwLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_core::Stream;
use serde::Serialize;
use serde_bytes::ByteBuf;
use socketioxide_core::{Str, Uid};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use super::link::{EnqueueError, Link, LinkLimits};
use super::routes::Routes;

use super::{MeshStats, ServerEvent, Stats, server_event::ServerEventHandler};
use crate::{
    Error, TransportKind,
    incidents::Incident,
    membership::{Member, Membership, keys},
    peers::NodeId,
    seed::SeedContext,
    telemetry,
    transport::Endpoint,
    wire::{self, Command, CommandRef, Hello, Query, Reply},
};

/// What a namespace's adapter does with messages from peers (type-erased `MeshAdapter<E>`).
pub(crate) trait NsHandler: Send + Sync + 'static {
    /// Apply a command from a peer.
    fn apply(&self, cmd: Command);
    /// Answer a query from a peer.
    fn answer(&self, query: Query) -> Pin<Box<dyn Stream<Item = Reply> + Send>>;
    /// Number of local sockets (observability).
    fn num_sockets(&self) -> usize;
    /// The rooms with at least one local socket (interest-based routing).
    fn room_names(&self) -> std::collections::HashSet<socketioxide_core::adapter::Room>;
    /// Its rooms on this node and their sockets (observability).
    fn local_rooms(&self) -> Vec<(String, usize)>;
}

/// Command kinds, as the `kind` label of the command counters.
pub(crate) const COMMAND_KINDS: [&str; 7] = [
    "broadcast",
    "join",
    "leave",
    "disconnect",
    "server_event",
    "interest",
    "probe",
];

pub(crate) fn kind_of_ref(cmd: &CommandRef<'_>) -> usize {
    match cmd {
        CommandRef::Broadcast { .. } => 0,
        CommandRef::AddSockets { .. } => 1,
        CommandRef::DelSockets { .. } => 2,
        CommandRef::DisconnectSockets { .. } => 3,
        CommandRef::ServerEvent { .. } => 4,
        CommandRef::Interest { .. } => INTEREST_KIND,
        CommandRef::Probe(_) => PROBE_KIND,
    }
}

pub(crate) fn kind_of(cmd: &Command) -> usize {
    match cmd {
        Command::Broadcast { .. } => 0,
        Command::AddSockets { .. } => 1,
        Command::DelSockets { .. } => 2,
        Command::DisconnectSockets { .. } => 3,
        Command::ServerEvent { .. } => 4,
        Command::Interest { .. } => INTEREST_KIND,
        Command::Probe(_) => PROBE_KIND,
    }
}

/// The kind index of interest announcements (in [`COMMAND_KINDS`]).
pub(crate) const INTEREST_KIND: usize = 5;
/// The kind index of failure-detection messages (in [`COMMAND_KINDS`]).
pub(crate) const PROBE_KIND: usize = 6;

/// How often a peer gets a full snapshot of this node's rooms even when nothing changed (it
/// repairs a view that missed its snapshot, say on a connection replaced mid-write).
/// Rare: a snapshot of 10,000 rooms is ~200 KB, so this costs ~7 KB/s per peer at most.
pub(crate) const INTEREST_REFRESH: Duration = Duration::from_secs(30);

/// Server events queued per sending peer for the handler, at most.
pub(crate) const SERVER_EVENT_QUEUE: usize = 1024;

/// Which sequence a [`Retired`] entry is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Side {
    /// Commands this node numbered for the peer.
    Sent,
    /// Commands of the peer this node applied.
    Applied,
}

/// Where the command sequences of forgotten nodes (declared dead, left) stopped, kept for a
/// while: a node that comes back (a frozen process resumed) continues its numbering, so what
/// it missed in between is counted exactly ([`MeshStats::commands_missed`]). Bounded; the
/// receiving side keeps its entries twice as long and twice as many as the sending side, so
/// a gap is never measured against a forgotten count.
#[derive(Debug, Default)]
pub(crate) struct Retired {
    sent: HashMap<NodeId, (u64, Instant)>,
    applied: HashMap<NodeId, (u64, Instant)>,
}

/// How long, and how many, sending sequences are kept (receiving: twice).
const RETIRED_FOR: Duration = crate::peers::DEAD_ADDR_MEMORY;
const MAX_RETIRED: usize = 4096;

impl Retired {
    fn map(&mut self, side: Side) -> (&mut HashMap<NodeId, (u64, Instant)>, u32) {
        match side {
            Side::Sent => (&mut self.sent, 1),
            Side::Applied => (&mut self.applied, 2),
        }
    }

    pub(crate) fn put(&mut self, side: Side, node: NodeId, seq: u64, now: Instant) {
        let (map, scale) = self.map(side);
        let max = MAX_RETIRED * scale as usize;
        if map.len() >= max {
            map.retain(|_, (_, at)| now.duration_since(*at) < RETIRED_FOR * scale);
        }
        if map.len() >= max {
            // Still full of recent entries: forget the oldest.
            if let Some(oldest) = map.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(node, (seq, now));
    }

    pub(crate) fn take(&mut self, side: Side, node: &NodeId, now: Instant) -> Option<u64> {
        let (map, scale) = self.map(side);
        let (seq, at) = map.remove(node)?;
        (now.duration_since(at) < RETIRED_FOR * scale).then_some(seq)
    }
}

/// Settings the running node needs (a copy of the relevant [`MeshConfig`] parts).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub request_timeout: Duration,
    pub max_frame_size: usize,
    pub link_limits: LinkLimits,
    pub max_concurrent_streams: u32,
    pub connect_timeout: Duration,
    pub transport: TransportKind,
    /// Interest-based routing: announce this node's rooms, filter room broadcasts.
    pub routing: bool,
    pub interest_interval: Duration,
    pub max_interest_rooms: usize,
}

/// The state shared by the [`Mesh`] handles, the adapters and the tasks.
pub(crate) struct Shared {
    /// What the running node needs of its configuration.
    pub settings: Settings,
    /// This node's id, as members know it.
    pub node_id: Uid,
    /// The same id, as tables key it.
    pub node_key: NodeId,
    /// What this node says in handshakes.
    pub hello: Hello,
    /// The bound address of the transport endpoint.
    pub local_addr: SocketAddr,
    /// The socketioxide server id of the `SocketIo` bound to this mesh (one per mesh).
    pub sio_id: OnceLock<Uid>,
    /// Lock: the set of links, by node. Written by the driver only (link created, forgotten);
    /// read by stats, metrics and the topology. The data path reads `routes` instead.
    pub links: RwLock<HashMap<NodeId, Arc<Link>>>,
    /// Where commands and requests go: a snapshot the driver rebuilds on every change, read
    /// without a lock by every broadcast.
    pub routes: ArcSwap<Routes>,
    /// Lock: the namespaces this node serves and their adapters. Written when a namespace is
    /// registered or dropped; read when a peer's command or query arrives.
    pub namespaces: RwLock<HashMap<String, Weak<dyn NsHandler>>>,
    /// Lock: per peer, how many of its commands were applied (queries wait on it). Taken when
    /// a peer's command stream or query starts, and when a node is forgotten.
    pub inbound: Mutex<HashMap<NodeId, watch::Sender<u64>>>,
    /// Lock: where the sequences of forgotten nodes stopped, for when they come back.
    pub retired: Mutex<Retired>,
    /// Lock: peers that had a join applied here since this node last announced its rooms to
    /// them (their pins wait for an announcement; see [`crate::interest`]).
    pub interest_sync: Mutex<std::collections::HashSet<NodeId>>,
    /// Lock: the server event handler (replaced by `Mesh::on_server_event`).
    pub server_handler: RwLock<Option<ServerEventHandler>>,
    /// Lock: per sending peer, the queue of its server events for the handler (see
    /// [`Shared::deliver_server_event`]).
    pub server_events: Mutex<HashMap<String, mpsc::Sender<ServerEvent>>>,
    /// The live members (without this node), published by the driver.
    pub members_tx: watch::Sender<Arc<Vec<Member>>>,
    /// Pongs and suspicions received from peers, for the driver's prober. Bounded: past it
    /// they are dropped (a probe then times out, as over a lossy link).
    pub probe_tx: mpsc::Sender<(NodeId, wire::Probe)>,
    /// See [`Mesh::watch_ready`](super::Mesh::watch_ready).
    pub ready_tx: watch::Sender<bool>,
    /// Requests in flight at most (`max_in_flight_requests`).
    pub request_permits: Arc<Semaphore>,
    /// Counters (atomics).
    pub stats: Arc<Stats>,
    /// Gossip membership.
    pub membership: Membership,
    /// The transport endpoint.
    pub transport: Endpoint,
    /// Gossip received from peers, for membership.
    pub gossip_in: mpsc::Sender<(SocketAddr, crate::membership::GossipMessage)>,
    /// What seed sources are told about this node.
    pub seed_ctx: SeedContext,
    /// Stops every task of this node.
    pub cancel: CancellationToken,
    /// Every task of this node, to wait for them on shutdown.
    pub tasks: TaskTracker,
    /// Where the first peers come from.
    pub seeds: Vec<Arc<dyn crate::seed::SeedSource>>,
}

impl Shared {
    /// See [`Mesh::stats`].
    pub(crate) fn snapshot(&self) -> MeshStats {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (mut queued_commands, mut queued_bytes) = (0, 0);
        for link in self.links().values() {
            let (n, bytes) = link.depth();
            queued_commands += n as u64;
            queued_bytes += bytes as u64;
        }
        let io = self.transport.io();
        MeshStats {
            commands_sent: l(&s.commands_sent),
            commands_received: l(&s.commands_received),
            commands_lost: l(&s.commands_lost),
            commands_missed: l(&s.commands_missed),
            commands_queued_by_kind: COMMAND_KINDS
                .iter()
                .zip(&s.queued_by_kind)
                .map(|(k, v)| (k.to_string(), l(v)))
                .collect(),
            commands_applied_by_kind: COMMAND_KINDS
                .iter()
                .zip(&s.applied_by_kind)
                .map(|(k, v)| (k.to_string(), l(v)))
                .collect(),
            command_bytes_sent: l(&s.command_bytes_sent),
            command_bytes_received: l(&s.command_bytes_received),
            gossip_bytes_sent: l(&s.gossip_bytes_sent),
            gossip_bytes_received: l(&s.gossip_bytes_received),
            batches_sent: l(&s.batches_sent),
            volatile_dropped: l(&s.volatile_dropped),
            slow_peer_cutoffs: l(&s.slow_peer_cutoffs),
            socket_buffer_drops: l(&s.socket_buffer_drops),
            queued_commands,
            queued_bytes,
            peer_send_calls: l(&io.send_calls),
            peer_recv_calls: l(&io.recv_calls),
            protocol_errors: l(&s.protocol_errors) + self.transport.protocol_errors(),
            handshakes_refused: self.transport.incidents().inbound_refused(),
            dials_failed: l(&s.dials_failed),
            incidents: self.transport.incidents().counts(),
            requests: l(&s.requests),
            requests_in_flight: l(&s.asks_in_flight),
            server_events_dropped: l(&s.server_events_dropped),
            request_peer_failures: l(&s.request_peer_failures),
            queries_answered: l(&s.queries_answered),
            queries_refused: l(&s.queries_refused),
            broadcasts_routed_away: l(&s.broadcasts_routed_away),
            probes_unanswered: l(&s.probes_unanswered),
            peers_declared_dead: l(&s.peers_declared_dead),
        }
    }

    /// See [`Mesh::record_metrics`].
    pub(crate) fn record_metrics(&self, stats: &MeshStats) {
        let links: Vec<telemetry::LinkView> = self
            .links()
            .values()
            .map(|l| {
                let (queued, queued_bytes) = l.depth();
                telemetry::LinkView {
                    peer: l.node_uid.to_string(),
                    connected: l.state.borrow().conn.is_some(),
                    queued,
                    queued_bytes,
                }
            })
            .collect();
        let members = self.members_tx.borrow().len();
        let dead = self.stats.dead_members_now.load(Ordering::Relaxed) as usize;
        telemetry::publish(
            stats,
            members,
            dead,
            self.settings.transport.as_str(),
            &links,
        );
    }

    pub(crate) fn links(&self) -> std::sync::RwLockReadGuard<'_, HashMap<NodeId, Arc<Link>>> {
        self.links.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Encode a message, refusing one larger than the frame limit.
    pub(crate) fn encode_frame<T: Serialize>(&self, msg: &T) -> Result<Bytes, Error> {
        let frame = wire::encode(msg)?;
        if frame.len() > self.settings.max_frame_size {
            return Err(Error::Encode(format!(
                "message of {} bytes exceeds max_frame_size ({} bytes)",
                frame.len(),
                self.settings.max_frame_size
            )));
        }
        Ok(frame)
    }

    /// Queue a command to each link, in order; the number of links it was offered to. Never
    /// waits: a full queue drops a volatile message or cuts the slow peer off.
    pub(crate) fn send_command<'a>(
        &self,
        kind: usize,
        links: impl IntoIterator<Item = &'a Arc<Link>>,
        frame: Bytes,
        volatile: bool,
    ) -> usize {
        let (mut offered, mut queued) = (0, 0);
        for link in links {
            offered += 1;
            match link.enqueue(frame.clone(), volatile) {
                Ok(()) => queued += 1,
                Err(EnqueueError::Full) if volatile => {
                    self.stats.volatile_dropped.fetch_add(1, Ordering::Relaxed);
                    self.transport.incidents().note_loss(
                        Incident::VolatileShed,
                        None,
                        1,
                        &format_args!("peer {}", link.node_uid),
                    );
                }
                Err(EnqueueError::Full) => {
                    self.stats.commands_lost.fetch_add(1, Ordering::Relaxed);
                    link.cut_off("command queue over its bound");
                }
                Err(EnqueueError::Gone) => {}
            }
        }
        self.stats.queued_by_kind[kind].fetch_add(queued, Ordering::Relaxed);
        offered
    }

    /// Queue a failure-detection message to `links` (see [`crate::probe`]), encoded once.
    pub(crate) fn send_probe(&self, links: &[Arc<Link>], probe: &wire::Probe) {
        match self.encode_frame(&CommandRef::Probe(probe)) {
            Ok(frame) => {
                self.send_command(PROBE_KIND, links, frame, false);
            }
            Err(e) => warn!(error = %e, "probe could not be encoded"),
        }
    }

    /// `n` peer deliveries of a room broadcast skipped by interest-based routing.
    pub(crate) fn count_routed_away(&self, n: usize) {
        if n > 0 {
            self.stats
                .broadcasts_routed_away
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn ns_handler(&self, ns: &str) -> Option<Arc<dyn NsHandler>> {
        self.namespaces
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(ns)
            .and_then(Weak::upgrade)
    }

    /// Register a namespace served by this node and publish it in gossip.
    pub(crate) async fn register_ns(
        &self,
        ns: &Str,
        sio_id: Uid,
        handler: Weak<dyn NsHandler>,
    ) -> Result<(), Error> {
        let bound = *self.sio_id.get_or_init(|| sio_id);
        if bound != sio_id {
            return Err(Error::OtherServer(bound.to_string()));
        }
        self.namespaces
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ns.to_string(), handler);
        self.membership
            .set(keys::SERVER_ID, &sio_id.to_string())
            .await;
        self.membership
            .set(&format!("{}{}", keys::NAMESPACE_PREFIX, ns), "")
            .await;
        debug!(ns = %ns, "namespace registered");
        Ok(())
    }

    pub(crate) async fn unregister_ns(&self, ns: &Str) {
        self.namespaces
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ns.as_str());
        self.membership
            .delete(&format!("{}{}", keys::NAMESPACE_PREFIX, ns))
            .await;
    }

    /// The applied-commands counter of a peer.
    pub(crate) fn inbound(&self, peer: NodeId) -> watch::Sender<u64> {
        self.inbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_insert_with(|| {
                let restored = self.retired.lock().unwrap_or_else(|e| e.into_inner()).take(
                    Side::Applied,
                    &peer,
                    Instant::now(),
                );
                watch::channel(restored.unwrap_or(0)).0
            })
            .clone()
    }

    /// A command stream from `peer` starts: its announcements count from now on, and until
    /// its snapshot arrives it gets every broadcast. Returns the stream's number.
    pub(crate) fn interest_stream_starts(&self, peer: NodeId) -> u64 {
        let Some(link) = self.links().get(&peer).cloned() else {
            return 0;
        };
        let mut interest = link.interest.write().unwrap_or_else(|e| e.into_inner());
        interest.reset();
        link.interest_stream.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The command stream `stream` from `peer` ended: unknown again, unless a newer one
    /// started meanwhile.
    pub(crate) fn interest_stream_ends(&self, peer: NodeId, stream: u64) {
        let Some(link) = self.links().get(&peer).cloned() else {
            return;
        };
        let mut interest = link.interest.write().unwrap_or_else(|e| e.into_inner());
        if link.interest_stream.load(Ordering::Acquire) == stream {
            interest.reset();
        }
    }

    /// Apply a command from `peer`'s command stream `stream`.
    pub(crate) fn apply_from(self: &Arc<Self>, peer: Uid, stream: u64, cmd: Command) {
        match cmd {
            Command::Probe(probe) => {
                self.stats.applied_by_kind[PROBE_KIND].fetch_add(1, Ordering::Relaxed);
                match probe {
                    wire::Probe::Ping(nonce) => {
                        let link = self.links().get(&*peer).cloned();
                        if let Some(link) = link {
                            self.send_probe(&[link], &wire::Probe::Pong(nonce));
                        }
                    }
                    other => {
                        if self.probe_tx.try_send((*peer, other)).is_err() {
                            debug!(peer = %peer, "prober busy: probe message dropped");
                        }
                    }
                }
            }
            Command::Interest {
                applied,
                snapshot,
                namespaces,
            } => {
                self.stats.applied_by_kind[INTEREST_KIND].fetch_add(1, Ordering::Relaxed);
                let Some(link) = self.links().get(&*peer).cloned() else {
                    return;
                };
                let mut interest = link.interest.write().unwrap_or_else(|e| e.into_inner());
                // Announcements of a stream that is no longer the peer's current one are
                // stale: the current one brings its own snapshot.
                if link.interest_stream.load(Ordering::Acquire) == stream {
                    interest.apply(applied, snapshot, namespaces);
                }
            }
            cmd => {
                if matches!(cmd, Command::AddSockets { .. }) && self.settings.routing {
                    self.interest_sync
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(*peer);
                }
                self.apply(peer, cmd);
            }
        }
    }

    /// The namespaces this node serves and their adapters (taken out of the lock).
    pub(crate) fn handlers(&self) -> Vec<(String, Arc<dyn NsHandler>)> {
        self.namespaces
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(ns, h)| Some((ns.clone(), h.upgrade()?)))
            .collect()
    }

    /// This node's rooms now, per namespace (namespaces without rooms left out).
    fn local_rooms(&self) -> crate::interest::LocalRooms {
        self.handlers()
            .into_iter()
            .filter_map(|(ns, h)| {
                let rooms = h.room_names();
                (!rooms.is_empty()).then(|| (Str::from(ns), rooms))
            })
            .collect()
    }

    /// Announce this node's rooms to the peers that take part in interest-based routing:
    /// a snapshot on every new connection and every [`INTEREST_REFRESH`], the changes every
    /// `interest_interval` when there are any (or when a peer's join was applied here, so
    /// its pins can go).
    pub(crate) async fn announce_interest(self: Arc<Self>) {
        let mut announcer = crate::interest::Announcer::default();
        // Per peer: the connection its last snapshot went on, and when.
        let mut snapshots: HashMap<NodeId, (u64, Instant)> = HashMap::new();
        let mut pacer = crate::interest::ScanPacer::new(self.settings.interest_interval);
        let mut wait = self.settings.interest_interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.cancel.cancelled() => return,
            }
            // No peer takes part in routing (alone, or beside nodes of a previous release):
            // nothing to announce, nothing to scan for. The first scan after one appears
            // comes before its snapshot.
            if self.routes.load().interest_links().next().is_none() {
                continue;
            }
            let scan = Instant::now();
            let changes = announcer.changes(self.local_rooms(), self.settings.max_interest_rooms);
            wait = pacer.after_scan(scan.elapsed());
            let synced =
                std::mem::take(&mut *self.interest_sync.lock().unwrap_or_else(|e| e.into_inner()));
            let routes = self.routes.load();
            let now = Instant::now();
            let mut seen = Vec::new();
            // Built once a round, for the peers due a snapshot.
            let mut snapshot = None;
            for link in routes.interest_links() {
                seen.push(link.node);
                let Some(conn) = link.state.borrow().conn.as_ref().map(|c| c.id()) else {
                    continue; // announced with a snapshot once connected
                };
                let due = match snapshots.get(&link.node) {
                    Some((on, at)) => *on != conn || now.duration_since(*at) >= INTEREST_REFRESH,
                    None => true,
                };
                let applied = *self.inbound(link.node).borrow();
                if due {
                    snapshots.insert(link.node, (conn, now));
                    let snapshot = snapshot.get_or_insert_with(|| announcer.snapshot());
                    self.send_interest(link, applied, true, snapshot, &announcer);
                } else if !changes.is_empty() || synced.contains(&link.node) {
                    self.send_interest(link, applied, false, &changes, &announcer);
                }
            }
            snapshots.retain(|node, _| seen.contains(node));
        }
    }

    fn send_interest(
        &self,
        link: &Arc<Link>,
        applied: u64,
        snapshot: bool,
        namespaces: &[wire::NsInterest],
        announcer: &crate::interest::Announcer,
    ) {
        let frame = self
            .encode_frame(&CommandRef::Interest {
                applied,
                snapshot,
                namespaces,
            })
            .or_else(|e| {
                // Too many rooms for one frame: every namespace as "everything" (small).
                debug!(error = %e, "interest announcement too large: announcing every room");
                self.encode_frame(&CommandRef::Interest {
                    applied,
                    snapshot: true,
                    namespaces: &announcer.snapshot_everything(),
                })
            });
        match frame {
            Ok(frame) => {
                self.send_command(INTEREST_KIND, std::slice::from_ref(link), frame, false);
            }
            Err(e) => warn!(error = %e, "interest announcement could not be encoded"),
        }
    }

    /// A command stream from `peer` starts at `start_seq`: the commands before it that were
    /// not applied never will be. Counts them and moves the applied count past them (queries
    /// waiting for them must not wait forever).
    pub(crate) fn command_stream_starts(&self, peer: &Hello, start_seq: u64) -> watch::Sender<u64> {
        let applied = self.inbound(*peer.node_id);
        let mut missed = 0;
        applied.send_if_modified(|n| {
            missed = start_seq.saturating_sub(*n);
            *n = (*n).max(start_seq);
            missed > 0
        });
        if missed > 0 {
            self.stats
                .commands_missed
                .fetch_add(missed, Ordering::Relaxed);
            self.transport.incidents().note_loss(
                Incident::CommandsMissed,
                Some(peer.advertise_addr),
                missed,
                &format_args!("peer {}", peer.node_id),
            );
        }
        applied
    }

    /// Hand a peer's server event to the handler without holding up that peer's ordered
    /// command stream: each sender gets a queue and a task that runs the handler on tokio's
    /// blocking pool, one event after the other (per-sender order kept; a slow or blocking
    /// handler delays only that sender's later server events). Bounded: an event that finds
    /// its sender's queue full ([`SERVER_EVENT_QUEUE`]) is dropped and counted.
    fn deliver_server_event(self: &Arc<Self>, ev: ServerEvent) {
        if self
            .server_handler
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return;
        }
        let from = ev.from;
        let tx = {
            let mut queues = self.server_events.lock().unwrap_or_else(|e| e.into_inner());
            queues
                .entry(from.to_string())
                .or_insert_with(|| {
                    let (tx, mut rx) = mpsc::channel::<ServerEvent>(SERVER_EVENT_QUEUE);
                    let (shared, cancel) = (Arc::downgrade(self), self.cancel.clone());
                    self.tasks.spawn(async move {
                        loop {
                            let ev = tokio::select! {
                                ev = rx.recv() => match ev {
                                    Some(ev) => ev,
                                    None => return,
                                },
                                _ = cancel.cancelled() => return,
                            };
                            // The handler of the moment (it may be replaced at any time).
                            let Some(h) = shared.upgrade().and_then(|s| {
                                s.server_handler
                                    .read()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .clone()
                            }) else {
                                return;
                            };
                            if tokio::task::spawn_blocking(move || h(ev)).await.is_err() {
                                warn!(peer = %from, "the server event handler panicked");
                            }
                        }
                    });
                    tx
                })
                .clone()
        };
        if tx.try_send(ev).is_err() {
            self.stats
                .server_events_dropped
                .fetch_add(1, Ordering::Relaxed);
            self.transport.incidents().note_loss(
                Incident::ServerEventsDropped,
                None,
                1,
                &format_args!("peer {from}: the handler does not keep up"),
            );
        }
    }

    /// The node is forgotten (dead or gone): keep where its sequences stopped, in both
    /// directions, for when it comes back.
    pub(crate) fn retire(&self, node: &NodeId, sent: Option<u64>) {
        // Its server events still queued are handled, then the queue's task ends.
        self.server_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(node.as_str());
        let applied = self
            .inbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(node)
            .map(|tx| *tx.borrow());
        let now = Instant::now();
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sent) = sent {
            retired.put(Side::Sent, *node, sent, now);
        }
        if let Some(applied) = applied {
            retired.put(Side::Applied, *node, applied, now);
        }
    }

    /// Apply a command received from `from`.
    pub(crate) fn apply(self: &Arc<Self>, from: Uid, cmd: Command) {
        self.stats.applied_by_kind[kind_of(&cmd)].fetch_add(1, Ordering::Relaxed);
        match cmd {
            Command::ServerEvent { event, data } => self.deliver_server_event(ServerEvent {
                from,
                event,
                data: data.0,
                ack: None,
            }),
            cmd => {
                let Some(ns) = cmd.ns() else { return };
                match self.ns_handler(ns) {
                    Some(h) => h.apply(cmd),
                    None => debug!(ns = %ns, "command for a namespace this node does not serve"),
                }
            }
        }
    }

    /// Answer a query received from `from`.
    pub(crate) fn answer(
        &self,
        from: Uid,
        query: Query,
    ) -> Pin<Box<dyn Stream<Item = Reply> + Send>> {
        use futures_util::StreamExt;
        match query {
            Query::ServerEventWithAck { event, data } => {
                let handler = self
                    .server_handler
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let Some(handler) = handler else {
                    return Box::pin(futures_util::stream::once(async { Reply::ServerAck(None) }));
                };
                let (tx, rx) = oneshot::channel();
                handler(ServerEvent {
                    from,
                    event,
                    data: data.0,
                    ack: Some(tx),
                });
                let timeout = self.settings.request_timeout;
                Box::pin(futures_util::stream::once(async move {
                    match tokio::time::timeout(timeout, rx).await {
                        Ok(Ok(bytes)) => Reply::ServerAck(Some(ByteBuf::from(bytes.to_vec()))),
                        _ => Reply::ServerAck(None),
                    }
                }))
            }
            query => {
                let handler = query.ns().and_then(|ns| self.ns_handler(ns));
                match handler {
                    Some(h) => h.answer(query),
                    // Requests go to every member: one that does not serve the namespace
                    // has nothing to contribute.
                    None => {
                        let empty = match query {
                            Query::FetchSockets { .. } => Reply::Sockets {
                                server_id: self.sio_id.get().copied().unwrap_or_default(),
                                ids: Vec::new(),
                            },
                            Query::Rooms { .. } => Reply::Rooms(Vec::new()),
                            Query::BroadcastWithAck { .. } => Reply::AckCount(0),
                            Query::ServerEventWithAck { .. } => Reply::ServerAck(None),
                        };
                        futures_util::stream::once(async move { empty }).boxed()
                    }
                }
            }
        }
    }
}
