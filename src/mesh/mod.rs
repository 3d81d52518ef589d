//! [`Mesh`]: one per process. It owns the transport endpoint, membership, the links to peers
//! and the tasks that drive them, and is the state every [`MeshAdapter`](crate::MeshAdapter)
//! shares.

mod conn;
mod driver;
mod link;
mod request;
mod routes;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    fmt,
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
use serde::{Serialize, de::DeserializeOwned};
use serde_bytes::ByteBuf;
use socketioxide_core::{Str, Uid};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

pub(crate) use link::{EnqueueError, Link, LinkLimits};
pub(crate) use request::{Mode, Outgoing};
pub(crate) use routes::Routes;

use crate::{
    Error, MeshConfig, TransportKind,
    incidents::Incident,
    membership::{Member, Membership, keys},
    peers::NodeId,
    seed::SeedContext,
    telemetry,
    transport::{Endpoint, TransportSettings, quic::QuicTransport, ws::WsTransport},
    wire::{self, Command, CommandRef, Hello, Query, QueryRef, Reply},
};

/// What a namespace's adapter does with messages from peers (type-erased `MeshAdapter<E>`).
pub(crate) trait NsHandler: Send + Sync + 'static {
    /// Apply a command from a peer.
    fn apply(&self, cmd: Command);
    /// Answer a query from a peer.
    fn answer(&self, query: Query) -> Pin<Box<dyn Stream<Item = Reply> + Send>>;
    /// Number of local sockets (observability).
    fn num_sockets(&self) -> usize;
    /// Its rooms on this node and their sockets (observability).
    fn local_rooms(&self) -> Vec<(String, usize)>;
}

/// The local address of the interface with a route outwards (no packet is sent: connecting a
/// UDP socket only picks a route), of the same family as `like`.
fn outward_ip(like: std::net::IpAddr) -> Option<std::net::IpAddr> {
    let (bind, probe): (SocketAddr, SocketAddr) = if like.is_ipv4() {
        (([0, 0, 0, 0], 0).into(), ([192, 0, 2, 1], 9).into())
    } else {
        (
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            ("2001:db8::1".parse::<std::net::Ipv6Addr>().ok()?, 9).into(),
        )
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(probe).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// Command kinds, as the `kind` label of the command counters.
pub(crate) const COMMAND_KINDS: [&str; 5] =
    ["broadcast", "join", "leave", "disconnect", "server_event"];

pub(crate) fn kind_of_ref(cmd: &CommandRef<'_>) -> usize {
    match cmd {
        CommandRef::Broadcast { .. } => 0,
        CommandRef::AddSockets { .. } => 1,
        CommandRef::DelSockets { .. } => 2,
        CommandRef::DisconnectSockets { .. } => 3,
        CommandRef::ServerEvent { .. } => 4,
    }
}

fn kind_of(cmd: &Command) -> usize {
    match cmd {
        Command::Broadcast { .. } => 0,
        Command::AddSockets { .. } => 1,
        Command::DelSockets { .. } => 2,
        Command::DisconnectSockets { .. } => 3,
        Command::ServerEvent { .. } => 4,
    }
}

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

/// Counters of what happened on this node since it started. Cheap to read.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub commands_sent: AtomicU64,
    pub commands_received: AtomicU64,
    pub commands_lost: AtomicU64,
    pub commands_missed: AtomicU64,
    pub command_bytes_sent: AtomicU64,
    pub command_bytes_received: AtomicU64,
    pub gossip_bytes_sent: AtomicU64,
    pub gossip_bytes_received: AtomicU64,
    /// Members declared dead lately (a gauge, set by the driver).
    pub dead_members_now: AtomicU64,
    /// Commands queued to peers and applied from peers, by kind ([`COMMAND_KINDS`]).
    pub queued_by_kind: [AtomicU64; COMMAND_KINDS.len()],
    pub applied_by_kind: [AtomicU64; COMMAND_KINDS.len()],
    pub batches_sent: AtomicU64,
    pub volatile_dropped: AtomicU64,
    pub slow_peer_cutoffs: AtomicU64,
    pub socket_buffer_drops: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub dials_failed: AtomicU64,
    pub requests: AtomicU64,
    /// Per-peer asks of requests in progress (a gauge).
    pub asks_in_flight: AtomicU64,
    pub server_events_dropped: AtomicU64,
    pub request_peer_failures: AtomicU64,
    pub queries_answered: AtomicU64,
    pub queries_refused: AtomicU64,
}

/// A snapshot of a node's counters ([`Mesh::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct MeshStats {
    /// Commands (broadcasts, joins, leaves, disconnects, server events) written to peers.
    pub commands_sent: u64,
    /// Commands received from peers and applied.
    pub commands_received: u64,
    /// Commands this node queued to a peer and dropped: the peer was cut off (slow), is gone
    /// (declared dead, left), or the write failed (then some of the batch may have arrived:
    /// an upper bound; the receiver's `commands_missed` is exact).
    pub commands_lost: u64,
    /// Commands peers sent to this node that never arrived: a connection broke with them in
    /// flight or queued (this node froze, was cut off as slow, or was declared dead and came
    /// back). Counted exactly, from the gap in the peer's sequence numbers when its next
    /// command stream starts.
    pub commands_missed: u64,
    /// Commands queued to peers, by kind (`broadcast`, `join`, `leave`, `disconnect`,
    /// `server_event`): one per peer it goes to.
    pub commands_queued_by_kind: std::collections::BTreeMap<String, u64>,
    /// Commands received from peers and applied, by kind.
    pub commands_applied_by_kind: std::collections::BTreeMap<String, u64>,
    /// Bytes of the commands sent to peers (frames, before transport overhead).
    pub command_bytes_sent: u64,
    /// Bytes of the commands received from peers.
    pub command_bytes_received: u64,
    /// Bytes of gossip (membership) messages sent to peers.
    pub gossip_bytes_sent: u64,
    /// Bytes of gossip messages received from peers.
    pub gossip_bytes_received: u64,
    /// Stream writes that carried the commands sent: `commands_sent / batches_sent` is the
    /// average number of commands per write.
    pub batches_sent: u64,
    /// Volatile broadcasts dropped because a peer had fallen behind (its queue held a quarter
    /// of `peer_queue_bytes`).
    pub volatile_dropped: u64,
    /// Times a peer was cut off: its queue went over `peer_queue_bytes`, or it accepted
    /// nothing for `slow_peer_timeout`.
    pub slow_peer_cutoffs: u64,
    /// Packets of peers' broadcasts that a local socket could not take because its buffer
    /// was full (see socketioxide's `max_buffer_size`).
    pub socket_buffer_drops: u64,
    /// Commands waiting in the peers' queues now.
    pub queued_commands: u64,
    /// Bytes waiting in the peers' queues now.
    pub queued_bytes: u64,
    /// System calls that wrote to peer sockets (`sendmsg`/`sendmmsg` for QUIC, `write`/
    /// `writev` for WebSocket): the cost of the data path, in calls.
    pub peer_send_calls: u64,
    /// System calls that read from peer sockets.
    pub peer_recv_calls: u64,
    /// Connections closed because the peer broke the protocol (malformed or oversize frame...).
    pub protocol_errors: u64,
    /// Incoming connections refused: by TLS (certificate missing or not from the cluster CA)
    /// or by the mesh handshake (wrong cluster, version, magic...).
    pub handshakes_refused: u64,
    /// Outgoing connections that failed (unreachable, refused by TLS or by the handshake).
    pub dials_failed: u64,
    /// Refused connections and failed dials by cause (each logged once per cause and
    /// address at WARN, then summarised).
    pub incidents: crate::IncidentCounts,
    /// Requests sent (fetch_sockets, rooms, broadcast with ack, server events with ack).
    pub requests: u64,
    /// Questions to peers in progress now (one per peer and request): a dropped request stops
    /// its questions at once.
    pub requests_in_flight: u64,
    /// Server events from peers dropped because the handler did not keep up (more than 1024
    /// queued from one peer).
    pub server_events_dropped: u64,
    /// Peers that failed to answer a request (died, disconnected, timed out).
    pub request_peer_failures: u64,
    /// Requests from peers answered.
    pub queries_answered: u64,
    /// Requests from peers refused because too many were in flight.
    pub queries_refused: u64,
}

/// A server-side event received from another node ([`Mesh::on_server_event`]).
pub struct ServerEvent {
    /// The node that emitted it.
    pub from: Uid,
    /// The event name.
    pub event: String,
    data: Bytes,
    ack: Option<oneshot::Sender<Bytes>>,
}

impl fmt::Debug for ServerEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerEvent")
            .field("from", &self.from)
            .field("event", &self.event)
            .field("len", &self.data.len())
            .field("wants_ack", &self.ack.is_some())
            .finish()
    }
}

impl ServerEvent {
    /// Decode the event's data.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, Error> {
        rmp_serde::from_slice(&self.data).map_err(|e| Error::Decode(e.to_string()))
    }

    /// Whether the emitter waits for an answer ([`Mesh::server_side_emit_with_ack`]).
    pub fn wants_ack(&self) -> bool {
        self.ack.is_some()
    }

    /// Answer the emitter. Does nothing if it did not ask for an answer.
    pub fn ack<T: Serialize + ?Sized>(mut self, value: &T) -> Result<(), Error> {
        if let Some(tx) = self.ack.take() {
            let bytes = rmp_serde::to_vec(value).map_err(|e| Error::Encode(e.to_string()))?;
            // The emitter may have given up waiting; nothing to do then.
            let _ = tx.send(Bytes::from(bytes));
        }
        Ok(())
    }
}

type ServerEventHandler = Arc<dyn Fn(ServerEvent) + Send + Sync>;

/// Settings the running node needs (a copy of the relevant [`MeshConfig`] parts).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub request_timeout: Duration,
    pub max_frame_size: usize,
    pub link_limits: LinkLimits,
    pub max_concurrent_streams: u32,
    pub connect_timeout: Duration,
    pub transport: TransportKind,
}

/// The state shared by the [`Mesh`] handles, the adapters and the tasks.
pub(crate) struct Shared {
    pub settings: Settings,
    pub node_id: Uid,
    pub node_key: NodeId,
    pub hello: Hello,
    pub local_addr: SocketAddr,
    pub sio_id: OnceLock<Uid>,
    /// Every link, by node (the driver's; readers use `routes`).
    pub links: RwLock<HashMap<NodeId, Arc<Link>>>,
    /// Where commands and requests go, rebuilt by the driver on every change.
    pub routes: ArcSwap<Routes>,
    pub namespaces: RwLock<HashMap<String, Weak<dyn NsHandler>>>,
    /// Commands applied per peer (for queries that must see them).
    pub inbound: Mutex<HashMap<NodeId, watch::Sender<u64>>>,
    /// Sequence numbers of forgotten nodes, for when they come back.
    pub retired: Mutex<Retired>,
    pub server_handler: RwLock<Option<ServerEventHandler>>,
    /// Per sending peer, the queue of its server events for the handler (see
    /// [`Shared::deliver_server_event`]).
    pub server_events: Mutex<HashMap<String, mpsc::Sender<ServerEvent>>>,
    pub members_tx: watch::Sender<Arc<Vec<Member>>>,
    /// See [`Mesh::watch_ready`].
    pub ready_tx: watch::Sender<bool>,
    pub request_permits: Arc<Semaphore>,
    pub stats: Arc<Stats>,
    pub membership: Membership,
    pub transport: Endpoint,
    pub gossip_in: mpsc::Sender<(SocketAddr, crate::membership::GossipMessage)>,
    pub seed_ctx: SeedContext,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
    pub seeds: Vec<Arc<dyn crate::seed::SeedSource>>,
}

/// A node of the mesh: the adapter state for socketioxide, and the handle for mesh-level
/// operations (members, server-side events, statistics, shutdown). Cheap to clone.
///
/// ```no_run
/// use socketioxide::{SocketIo, extract::SocketRef};
/// use socketioxide_mesh::{Mesh, MeshAdapter, MeshConfig, TlsConfig, StaticSeeds};
///
/// type A = MeshAdapter<socketioxide::adapter::Emitter>;
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let tls = TlsConfig::from_dir("/etc/mesh-tls")?;
/// let config = MeshConfig::new(tls)
///     .with_advertise_addr("10.0.0.5:7800".parse()?)
///     .with_seeds(StaticSeeds::new(["mesh-headless.default.svc.cluster.local:7800"]));
/// let mesh = Mesh::start(config).await?;
///
/// let (layer, io) = SocketIo::builder()
///     .with_adapter::<A>(mesh.clone())
///     .build_layer();
/// io.ns("/", async |s: SocketRef<A>| {
///     s.on("msg", async |s: SocketRef<A>| {
///         // reaches the sockets of every node
///         s.broadcast().emit("msg", "hello").await.ok();
///     });
/// })
/// .await?;
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Mesh {
    pub(crate) shared: Arc<Shared>,
    /// Cancels every task when the last handle is dropped.
    _guard: Arc<tokio_util::sync::DropGuard>,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("node_id", &self.shared.node_id)
            .field("addr", &self.shared.hello.advertise_addr)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Validate the configuration, open the transport endpoint, start membership and the
    /// driver. Returns once the node listens; peers are found in the background.
    pub async fn start(config: MeshConfig) -> Result<Mesh, Error> {
        config.validate()?;
        if let Err(e) = config.tls.check_own_certificate() {
            warn!(error = %e, "peers will refuse this node's certificate");
        }
        // The transport gets its settings, not the configuration (imports run downward).
        let settings = TransportSettings {
            incidents: Arc::default(),
            max_frame_size: config.max_frame_size,
            max_concurrent_streams: config.max_concurrent_streams,
            keep_alive_interval: config.keep_alive_interval,
            idle_timeout: config.idle_timeout,
            connect_timeout: config.connect_timeout,
        };
        let transport = match config.transport {
            TransportKind::Quic => Endpoint::Quic(QuicTransport::bind(
                config.listen_addr,
                &config.tls,
                settings,
            )?),
            TransportKind::Ws => {
                Endpoint::Ws(WsTransport::bind(config.listen_addr, &config.tls, settings).await?)
            }
        };
        Self::start_with_transport(config, transport).await
    }

    pub(crate) async fn start_with_transport(
        config: MeshConfig,
        transport: Endpoint,
    ) -> Result<Mesh, Error> {
        let local_addr = transport.local_addr();
        let advertise_addr = match config.advertise_addr {
            Some(a) => a,
            None if local_addr.port() == 0 => {
                return Err(crate::ConfigError::AdvertiseAddrInvalid(local_addr).into());
            }
            None if local_addr.ip().is_unspecified() => {
                // Listening on every interface with nothing said about which one peers use
                // (no MESH_ADVERTISE_ADDR, no POD_IP): the one that routes outwards.
                let ip = outward_ip(local_addr.ip())
                    .ok_or(crate::ConfigError::AdvertiseAddrMissing(local_addr))?;
                let guessed = SocketAddr::new(ip, local_addr.port());
                info!(
                    advertise = %guessed,
                    "advertising the address of the interface that routes outwards; set \
                     MESH_ADVERTISE_ADDR (with_advertise_addr) to choose another"
                );
                guessed
            }
            None => local_addr,
        };
        let node_id = Uid::new();
        let membership_settings = crate::membership::MembershipSettings {
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            phi_threshold: config.phi_threshold,
            dead_node_grace_period: config.dead_node_grace_period,
            transport: config.transport.as_str(),
        };
        let (membership, pipes) =
            Membership::start(&membership_settings, node_id, advertise_addr).await?;
        let hello = Hello {
            cluster_id: config.cluster_id.clone(),
            node_id,
            advertise_addr,
            transport: config.transport.as_str().to_string(),
        };
        let settings = Settings {
            request_timeout: config.request_timeout,
            max_frame_size: config.max_frame_size,
            link_limits: LinkLimits {
                queue_len: config.peer_queue_len,
                queue_bytes: config.peer_queue_bytes,
                stall_timeout: config.slow_peer_timeout,
                batch_delay: config.batch_delay,
            },
            max_concurrent_streams: config.max_concurrent_streams,
            connect_timeout: config.connect_timeout,
            transport: config.transport,
        };
        let cancel = CancellationToken::new();
        let (members_tx, _) = watch::channel(Arc::new(Vec::new()));
        let shared = Arc::new(Shared {
            settings,
            node_id,
            node_key: *node_id,
            hello,
            local_addr,
            sio_id: OnceLock::new(),
            links: RwLock::new(HashMap::new()),
            routes: ArcSwap::from_pointee(Routes::default()),
            namespaces: RwLock::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
            retired: Mutex::new(Retired::default()),
            server_events: Mutex::new(HashMap::new()),
            server_handler: RwLock::new(None),
            members_tx,
            ready_tx: watch::channel(false).0,
            request_permits: Arc::new(Semaphore::new(config.max_in_flight_requests)),
            stats: Arc::new(Stats::default()),
            membership,
            transport,
            gossip_in: pipes.in_tx,
            seed_ctx: SeedContext {
                cluster_id: config.cluster_id.clone(),
                node_id,
                advertise_addr,
            },
            cancel: cancel.clone(),
            tasks: TaskTracker::new(),
            seeds: config.seeds.clone(),
        });
        driver::spawn(shared.clone(), &config, pipes.out_rx).await;
        info!(node = %node_id, addr = %advertise_addr, transport = %config.transport,
            cluster = %config.cluster_id, "mesh node started");
        Ok(Mesh {
            shared,
            _guard: Arc::new(cancel.drop_guard()),
        })
    }

    /// This node's mesh id.
    pub fn node_id(&self) -> Uid {
        self.shared.node_id
    }

    /// The address the transport is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The address peers dial to reach this node.
    pub fn advertise_addr(&self) -> SocketAddr {
        self.shared.hello.advertise_addr
    }

    /// The live members, without this node.
    pub fn members(&self) -> Vec<Member> {
        self.shared.members_tx.borrow().as_ref().clone()
    }

    /// A watch of the live members (without this node): await changes, e.g. for readiness.
    ///
    /// ```no_run
    /// # async fn f(mesh: socketioxide_mesh::Mesh) {
    /// let mut members = mesh.watch_members();
    /// members.wait_for(|m| m.len() >= 2).await.ok();
    /// # }
    /// ```
    pub fn watch_members(&self) -> watch::Receiver<Arc<Vec<Member>>> {
        self.shared.members_tx.subscribe()
    }

    /// Whether this node is ready to serve (a Kubernetes readiness probe): it has joined the
    /// mesh (its first round of seeds answered, and it connected to one of them and learned
    /// the members, or none of them could be reached: it is alone) and it has a connection to
    /// every live member, so what its clients emit reaches every node. Goes false while a
    /// member is live without a connection (being dialed, or cut off).
    ///
    /// ```no_run
    /// # async fn f(mesh: socketioxide_mesh::Mesh) {
    /// let mut ready = mesh.watch_ready();
    /// ready.wait_for(|r| *r).await.ok();
    /// assert!(mesh.ready());
    /// # }
    /// ```
    pub fn ready(&self) -> bool {
        *self.shared.ready_tx.borrow()
    }

    /// [`ready`](Self::ready) as a watch, to wait for it.
    pub fn watch_ready(&self) -> watch::Receiver<bool> {
        self.shared.ready_tx.subscribe()
    }

    /// The number of nodes serving namespace `ns`: this one plus the live peers serving it.
    /// (The adapter's `server_count` gives the same; socketioxide 0.18 does not expose it.)
    pub fn server_count(&self, ns: &str) -> u16 {
        let peers = self
            .shared
            .members_tx
            .borrow()
            .iter()
            .filter(|m| m.serves(ns))
            .count();
        u16::try_from(peers + 1).unwrap_or(u16::MAX)
    }

    /// Copy [`stats`](Self::stats) and the per-peer gauges to the [`metrics`] recorder now.
    /// The mesh does it every second on its own; call this from a `/metrics` handler for the
    /// values of the moment. Without a recorder installed it does nothing useful.
    ///
    /// ```no_run
    /// # async fn f(mesh: socketioxide_mesh::Mesh) {
    /// let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
    ///     .install_recorder()
    ///     .expect("one recorder per process");
    /// // in the /metrics handler:
    /// mesh.record_metrics();
    /// let text = prometheus.render();
    /// # let _ = text; }
    /// ```
    pub fn record_metrics(&self) {
        self.shared.record_metrics(&self.stats());
    }

    /// The mesh as this node sees it, ready to serialize (see [`Topology`](crate::Topology)).
    pub fn topology(&self) -> crate::Topology {
        use crate::topology::{MAX_ROOMS, NamespaceView, PeerView, RoomView};
        let shared = &self.shared;
        let handlers: Vec<(String, Arc<dyn NsHandler>)> = shared
            .namespaces
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(ns, h)| Some((ns.clone(), h.upgrade()?)))
            .collect();
        let mut namespaces: Vec<NamespaceView> = handlers
            .into_iter()
            .map(|(name, h)| {
                let mut rooms: Vec<RoomView> = h
                    .local_rooms()
                    .into_iter()
                    .map(|(name, sockets)| RoomView { name, sockets })
                    .collect();
                rooms.sort_by(|a, b| b.sockets.cmp(&a.sockets).then(a.name.cmp(&b.name)));
                rooms.truncate(MAX_ROOMS);
                NamespaceView {
                    name,
                    sockets: h.num_sockets(),
                    rooms,
                }
            })
            .collect();
        namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        let links = shared.links();
        let peers = self
            .members()
            .into_iter()
            .map(|m| {
                let link = links.get(&*m.node_id);
                let conn = link.and_then(|l| l.state.borrow().conn.clone());
                let (queued_commands, queued_bytes) = link.map(|l| l.depth()).unwrap_or((0, 0));
                PeerView {
                    node_id: m.node_id.to_string(),
                    addr: m.addr.to_string(),
                    namespaces: m.namespaces.clone(),
                    sockets: m.sockets,
                    link: if conn.is_some() {
                        "connected"
                    } else {
                        "connecting"
                    },
                    rtt_ms: conn.and_then(|c| c.rtt()).map(|d| d.as_secs_f64() * 1e3),
                    queued_commands,
                    queued_bytes,
                }
            })
            .collect();
        drop(links);
        crate::Topology {
            node_id: self.node_id().to_string(),
            addr: self.advertise_addr().to_string(),
            transport: shared.settings.transport.as_str(),
            ready: self.ready(),
            namespaces,
            peers,
            stats: self.stats(),
        }
    }

    /// Counters of what happened on this node.
    pub fn stats(&self) -> MeshStats {
        self.shared.snapshot()
    }

    /// Set the handler of server-side events emitted by other nodes (replaces any previous
    /// one). Socket.IO's `serverSideEmit`: messages between servers, not to clients. The
    /// handler runs on tokio's blocking pool, one event at a time per sending node (in the
    /// order it sent them), so even a blocking handler never holds up that node's broadcasts.
    ///
    /// ```no_run
    /// # fn f(mesh: socketioxide_mesh::Mesh) {
    /// mesh.on_server_event(|ev| {
    ///     if ev.event == "ping" {
    ///         let _ = ev.ack("pong");
    ///     }
    /// });
    /// # }
    /// ```
    pub fn on_server_event<F>(&self, handler: F)
    where
        F: Fn(ServerEvent) + Send + Sync + 'static,
    {
        *self
            .shared
            .server_handler
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(handler));
    }

    /// Emit an event to every other node (not to clients), in order with this node's other
    /// commands. Returns once queued.
    pub async fn server_side_emit<T: Serialize + ?Sized>(
        &self,
        event: &str,
        data: &T,
    ) -> Result<(), Error> {
        let data = rmp_serde::to_vec(data).map_err(|e| Error::Encode(e.to_string()))?;
        let cmd = CommandRef::ServerEvent {
            event,
            data: serde_bytes::Bytes::new(&data),
        };
        let frame = self.shared.encode_frame(&cmd)?;
        let routes = self.shared.routes.load();
        self.shared
            .send_command(kind_of_ref(&cmd), routes.links(), frame, false);
        Ok(())
    }

    /// Emit an event to every other node and collect their answers (the `ack` of their
    /// handlers). Ends when every live node answered or died, or after the request timeout.
    /// Nodes without a handler, or whose handler did not answer, give `None`.
    pub async fn server_side_emit_with_ack<T: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        event: &str,
        data: &T,
    ) -> Result<Vec<(Uid, Option<R>)>, Error> {
        let data = rmp_serde::to_vec(data).map_err(|e| Error::Encode(e.to_string()))?;
        let query = QueryRef::ServerEventWithAck {
            event,
            data: serde_bytes::Bytes::new(&data),
        };
        let targets = self.shared.routes.load().links().to_vec();
        let timeout = self.shared.settings.request_timeout;
        let mut out = self
            .shared
            .request("server_event", &targets, &query, Mode::Single, timeout)
            .await?;
        let mut answers = Vec::new();
        while let Some((node, reply)) = out.next().await {
            let from = out.uid_of(node);
            match reply {
                Reply::ServerAck(Some(bytes)) => match rmp_serde::from_slice(&bytes) {
                    Ok(v) => answers.push((from, Some(v))),
                    Err(e) => {
                        warn!(peer = %from, error = %e, "server event answer does not decode");
                        answers.push((from, None));
                    }
                },
                Reply::ServerAck(None) | Reply::Error(_) => answers.push((from, None)),
                other => debug!(peer = %from, ?other, "unexpected answer to a server event"),
            }
        }
        Ok(answers)
    }

    /// Leave the mesh gracefully: tell peers (so their requests stop waiting for this node at
    /// once), close connections, stop every task and wait for them.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        if shared.cancel.is_cancelled() {
            return;
        }
        shared.membership.set(keys::LEAVING, "1").await;
        // Close with "leaving": peers forget this node immediately, without waiting for the
        // failure detector.
        let links: Vec<Arc<Link>> = shared.links().values().cloned().collect();
        for link in &links {
            if let Some(conn) = link.state.borrow().conn.clone() {
                conn.close(crate::transport::CloseCode::Leaving, "node leaving");
            }
        }
        for seed in &shared.seeds {
            let ctx = shared.seed_ctx.clone();
            if tokio::time::timeout(Duration::from_secs(2), seed.leave(&ctx))
                .await
                .is_err()
            {
                debug!(
                    seed = seed.name(),
                    "seed source did not acknowledge leaving in time"
                );
            }
        }
        shared.cancel.cancel();
        shared.membership.shutdown().await;
        shared.transport.close();
        shared.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), shared.tasks.wait())
            .await
            .is_err()
        {
            warn!("some mesh tasks did not stop within 5 s");
        }
        info!(node = %shared.node_id, "mesh node stopped");
    }
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

    /// Queue a command to each link, in order. Never waits: a full queue drops a volatile
    /// message or cuts the slow peer off.
    pub(crate) fn send_command(
        &self,
        kind: usize,
        links: &[Arc<Link>],
        frame: Bytes,
        volatile: bool,
    ) {
        for link in links {
            match link.enqueue(frame.clone(), volatile) {
                Ok(()) => {
                    self.stats.queued_by_kind[kind].fetch_add(1, Ordering::Relaxed);
                }
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
