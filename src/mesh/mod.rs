//! [`Mesh`]: one per process. It owns the transport endpoint, membership, the links to peers
//! and the tasks that drive them, and is the state every [`MeshAdapter`](crate::MeshAdapter)
//! shares.

//!
//! ```text
//!   mod.rs          the public handle (`Mesh`): start, members, server events, stats, shutdown
//!   shared.rs       the state the handles, adapters and tasks share (`Shared`), and what it does
//!   stats.rs        counters (`Stats`, hot-path atomics) and their snapshot (`MeshStats`)
//!   server_event.rs server-side events between nodes
//!   driver.rs       the task that owns membership, the peer table and the connections
//!   conn.rs         one peer connection: handshake, readers, answers
//!   link.rs         one peer's ordered command queue and its batching writer
//!   request.rs      requests to peers (the I/O side of `crate::answers`)
//!   routes.rs       the routing snapshot broadcasts read
//! ```

mod conn;
mod driver;
mod link;
mod request;
mod routes;
mod server_event;
mod shared;
mod stats;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::Duration,
};

use arc_swap::ArcSwap;
use serde::{Serialize, de::DeserializeOwned};
use socketioxide_core::Uid;
use tokio::sync::{Semaphore, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

pub(crate) use link::{Link, LinkLimits};
pub(crate) use request::{Mode, Outgoing};
pub(crate) use routes::Routes;

use crate::{
    Error, MeshConfig, TransportKind,
    membership::{Member, Membership, keys},
    seed::SeedContext,
    transport::{Endpoint, TransportSettings, quic::QuicTransport, ws::WsTransport},
    wire::{CommandRef, Hello, QueryRef, Reply},
};

/// Pongs and suspicions from peers waiting for the prober, at most.
const PROBE_QUEUE: usize = 1024;

pub use server_event::ServerEvent;
pub(crate) use shared::{NsHandler, Retired, Settings, Shared, Side, kind_of_ref};
pub use stats::MeshStats;
pub(crate) use stats::Stats;

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
            interest: config.routing,
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
            routing: config.routing,
            interest_interval: config.interest_interval,
            max_interest_rooms: config.max_interest_rooms,
        };
        let cancel = CancellationToken::new();
        let (members_tx, _) = watch::channel(Arc::new(Vec::new()));
        let (probe_tx, probe_rx) = tokio::sync::mpsc::channel(PROBE_QUEUE);
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
            interest_sync: Mutex::default(),
            server_events: Mutex::new(HashMap::new()),
            server_handler: RwLock::new(None),
            members_tx,
            probe_tx,
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
        driver::spawn(shared.clone(), &config, pipes.out_rx, probe_rx).await;
        if config.routing {
            shared.tasks.spawn(shared.clone().announce_interest());
        }
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
        use crate::topology::{MAX_ROOMS, NamespaceView, PeerRooms, PeerView, RoomView};
        let shared = &self.shared;
        let mut namespaces: Vec<NamespaceView> = shared
            .handlers()
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
                    routing: m.interest && shared.settings.routing,
                    interest: link.and_then(|l| {
                        let interest = l.interest.read().unwrap_or_else(|e| e.into_inner());
                        interest.is_known().then(|| {
                            namespaces
                                .iter()
                                .map(|ns| {
                                    let rooms = interest.rooms(&ns.name);
                                    let every_room = rooms.is_none();
                                    let mut rooms = rooms.unwrap_or_default();
                                    rooms.truncate(MAX_ROOMS);
                                    PeerRooms {
                                        namespace: ns.name.clone(),
                                        every_room,
                                        rooms,
                                    }
                                })
                                .collect()
                        })
                    }),
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
