//! [`MeshConfig`]: typed settings with documented defaults, plus [`MeshConfig::from_env`] for
//! containers. Every value is checked by [`MeshConfig::validate`] before anything starts.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use crate::{
    error::ConfigError,
    seed::{SeedSource, StaticSeeds},
    tls::TlsConfig,
};

/// The default port of the peer transport (one UDP port for QUIC, one TCP port for WebSocket).
pub const DEFAULT_PORT: u16 = 7800;

/// The peer transport. Both carry the same protocol with the same guarantees and both use
/// mutual TLS; gossip rides the same connections, so a node opens exactly one port. All the
/// nodes of a cluster use the same transport: a `quic` node and a `ws` node cannot talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TransportKind {
    /// QUIC over UDP (quinn): one stream per request, many in flight without head-of-line
    /// blocking, and no blocking between streams when a packet is lost. The default.
    #[default]
    Quic,
    /// WebSocket over TCP with mutual TLS, for networks that block or mangle UDP. Requests are
    /// multiplexed on one connection with per-stream flow control; a lost TCP segment delays
    /// every stream of the connection until it is retransmitted.
    Ws,
}

impl TransportKind {
    /// The name used in configuration and in the handshake: `quic`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Quic => "quic",
            TransportKind::Ws => "ws",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "quic" => Ok(Self::Quic),
            "ws" | "websocket" => Ok(Self::Ws),
            other => Err(format!(
                "unknown transport {other:?}, expected \"quic\" or \"ws\""
            )),
        }
    }
}

/// The configuration of a [`Mesh`](crate::Mesh) node.
///
/// Build it with [`MeshConfig::new`] and the `with_*` setters (each documents its default), or
/// from environment variables with [`MeshConfig::from_env`].
///
/// ```
/// use std::time::Duration;
/// use socketioxide_mesh::{DevCa, MeshConfig, StaticSeeds};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let tls = DevCa::generate("demo")?.node_tls("node-a")?;
/// let config = MeshConfig::new(tls)
///     .with_cluster_id("chat")
///     .with_listen_addr("127.0.0.1:7800".parse()?)
///     .with_seeds(StaticSeeds::new(["127.0.0.1:7801", "127.0.0.1:7802"]))
///     .with_request_timeout(Duration::from_secs(2));
/// config.validate()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MeshConfig {
    pub(crate) cluster_id: String,
    pub(crate) transport: TransportKind,
    pub(crate) listen_addr: SocketAddr,
    pub(crate) advertise_addr: Option<SocketAddr>,
    pub(crate) tls: TlsConfig,
    pub(crate) tls_reload: Option<Duration>,
    pub(crate) seeds: Vec<Arc<dyn SeedSource>>,
    pub(crate) seed_interval: Duration,
    pub(crate) gossip_interval: Duration,
    pub(crate) phi_threshold: f64,
    pub(crate) dead_node_grace_period: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) max_frame_size: usize,
    pub(crate) peer_queue_len: usize,
    pub(crate) peer_queue_bytes: usize,
    pub(crate) slow_peer_timeout: Duration,
    pub(crate) batch_delay: Duration,
    pub(crate) routing: bool,
    pub(crate) interest_interval: Duration,
    pub(crate) max_interest_rooms: usize,
    pub(crate) max_concurrent_streams: u32,
    pub(crate) max_in_flight_requests: usize,
    pub(crate) keep_alive_interval: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) probe_interval: Duration,
    pub(crate) probe_timeout: Duration,
    pub(crate) link_grace: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
}

impl fmt::Debug for MeshConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshConfig")
            .field("cluster_id", &self.cluster_id)
            .field("transport", &self.transport)
            .field("listen_addr", &self.listen_addr)
            .field("advertise_addr", &self.advertise_addr)
            .field(
                "seeds",
                &self.seeds.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .field("gossip_interval", &self.gossip_interval)
            .field("request_timeout", &self.request_timeout)
            .field("max_frame_size", &self.max_frame_size)
            .field("peer_queue_len", &self.peer_queue_len)
            .finish_non_exhaustive()
    }
}

impl MeshConfig {
    /// A configuration with every default and the given TLS material (mandatory: there is no
    /// plaintext mode).
    pub fn new(tls: TlsConfig) -> Self {
        Self {
            cluster_id: "socketioxide-mesh".into(),
            transport: TransportKind::Quic,
            listen_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT),
            advertise_addr: None,
            tls,
            tls_reload: Some(Duration::from_secs(30)),
            seeds: Vec::new(),
            seed_interval: Duration::from_secs(5),
            gossip_interval: Duration::from_secs(5),
            phi_threshold: 8.0,
            dead_node_grace_period: Duration::from_secs(300),
            request_timeout: Duration::from_secs(5),
            max_frame_size: 16 * 1024 * 1024,
            peer_queue_len: 1 << 18,
            peer_queue_bytes: 64 * 1024 * 1024,
            slow_peer_timeout: Duration::from_secs(10),
            batch_delay: Duration::from_millis(3),
            routing: false,
            interest_interval: Duration::from_millis(20),
            max_interest_rooms: 10_000,
            max_concurrent_streams: 1024,
            max_in_flight_requests: 4096,
            keep_alive_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(600),
            link_grace: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(3),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }

    /// A profile for tests and local demos: listens on `127.0.0.1` with an OS-chosen port and
    /// gossips every 50 ms, so state spreads in a fraction of a second.
    pub fn local(tls: TlsConfig) -> Self {
        Self::new(tls)
            .with_listen_addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
            .with_gossip_interval(Duration::from_millis(50))
            .with_seed_interval(Duration::from_millis(500))
            .with_reconnect_backoff(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// Build a configuration from environment variables, for containers.
    ///
    /// | variable | meaning | default |
    /// |---|---|---|
    /// | `MESH_TLS_DIR` | folder with `ca.pem`, `node.pem`, `node.key` | — |
    /// | `MESH_TLS_CA`, `MESH_TLS_CERT`, `MESH_TLS_KEY` | PEM files (instead of `MESH_TLS_DIR`) | — |
    /// | `MESH_TLS_SERVER_NAME` | DNS name in every node certificate | `socketioxide-mesh.internal` |
    /// | `MESH_TLS_RELOAD_MS` | how often the TLS files are checked for changes (0: never) | 30000 |
    /// | `MESH_CLUSTER_ID` | cluster id | `socketioxide-mesh` |
    /// | `MESH_TRANSPORT` | `quic` or `ws` | `quic` |
    /// | `MESH_LISTEN_ADDR` | listen address | `0.0.0.0:7800` |
    /// | `MESH_ADVERTISE_ADDR` | address peers dial | `$POD_IP:<listen port>` if `POD_IP` is set, else the listen address, or (listening on `0.0.0.0`) the address of the interface that routes outwards |
    /// | `MESH_DISCOVERY_URL` | comma-separated discovery service URLs (`https` uses the node's TLS material) | none |
    /// | `MESH_SEEDS` | comma-separated `host:port` (names re-resolved, e.g. a headless Service) | none |
    /// | `MESH_SEED_INTERVAL_MS` | how often seed sources are asked | 5000 |
    /// | `MESH_GOSSIP_INTERVAL_MS` | gossip period | 100 |
    /// | `MESH_PHI_THRESHOLD` | failure detector threshold | 8 |
    /// | `MESH_REQUEST_TIMEOUT_MS` | bound on every request | 5000 |
    /// | `MESH_MAX_FRAME_SIZE` | bytes | 16777216 |
    /// | `MESH_PEER_QUEUE_LEN` | queued commands per peer | 262144 |
    /// | `MESH_PEER_QUEUE_BYTES` | queued bytes per peer | 67108864 |
    /// | `MESH_SLOW_PEER_TIMEOUT_MS` | a peer accepting nothing this long is cut off | 10000 |
    /// | `MESH_BATCH_DELAY_US` | on a busy link, how long a command may wait to share a write | 3000 |
    /// | `MESH_MAX_IN_FLIGHT` | concurrent outgoing requests | 4096 |
    /// | `MESH_ROUTING` | `true`/`false`: send a room broadcast only to the nodes with members in its rooms | `false` |
    /// | `MESH_INTEREST_INTERVAL_MS` | how often this node's rooms are announced when they change | 20 |
    /// | `MESH_MAX_INTEREST_ROOMS` | rooms announced per namespace, beyond which all are | 10000 |
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`from_env`](Self::from_env) with a custom lookup function (handy for tests and for
    /// reading a config map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let tls = match (
            get("MESH_TLS_DIR"),
            get("MESH_TLS_CA"),
            get("MESH_TLS_CERT"),
            get("MESH_TLS_KEY"),
        ) {
            (Some(dir), None, None, None) => TlsConfig::from_dir(dir)?,
            (None, Some(ca), Some(cert), Some(key)) => TlsConfig::from_pem_files(ca, cert, key)?,
            _ => {
                return Err(ConfigError::Value {
                    name: "tls",
                    reason:
                        "set MESH_TLS_DIR, or all of MESH_TLS_CA, MESH_TLS_CERT and MESH_TLS_KEY"
                            .into(),
                });
            }
        };
        let tls = match get("MESH_TLS_SERVER_NAME") {
            Some(name) => tls.with_server_name(name),
            None => tls,
        };
        let mut cfg = Self::new(tls);
        fn parse<T: FromStr>(var: &'static str, value: String) -> Result<T, ConfigError>
        where
            T::Err: fmt::Display,
        {
            value.trim().parse::<T>().map_err(|e| ConfigError::Env {
                var,
                reason: e.to_string(),
                value,
            })
        }
        let ms = |var: &'static str| -> Result<Option<Duration>, ConfigError> {
            get(var)
                .map(|v| parse::<u64>(var, v).map(Duration::from_millis))
                .transpose()
        };
        if let Some(v) = get("MESH_CLUSTER_ID") {
            cfg.cluster_id = v;
        }
        if let Some(v) = get("MESH_TRANSPORT") {
            cfg.transport = parse("MESH_TRANSPORT", v)?;
        }
        if let Some(v) = get("MESH_LISTEN_ADDR") {
            cfg.listen_addr = parse("MESH_LISTEN_ADDR", v)?;
        }
        match (get("MESH_ADVERTISE_ADDR"), get("POD_IP")) {
            (Some(v), _) => cfg.advertise_addr = Some(parse("MESH_ADVERTISE_ADDR", v)?),
            (None, Some(ip)) => {
                let ip: IpAddr = parse("POD_IP", ip)?;
                cfg.advertise_addr = Some(SocketAddr::new(ip, cfg.listen_addr.port()));
            }
            (None, None) => {}
        }
        if let Some(v) = get("MESH_DISCOVERY_URL") {
            let urls: Vec<&str> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            let env_err = |reason: String| ConfigError::Env {
                var: "MESH_DISCOVERY_URL",
                value: v.clone(),
                reason,
            };
            #[cfg(feature = "discovery-client")]
            {
                let mut discovery =
                    crate::seed::DiscoverySeeds::new(urls).map_err(|e| env_err(e.to_string()))?;
                if discovery.needs_tls() {
                    discovery = discovery
                        .with_tls(&cfg.tls)
                        .map_err(|e| env_err(e.to_string()))?;
                }
                cfg.seeds.push(Arc::new(discovery));
            }
            #[cfg(not(feature = "discovery-client"))]
            {
                let _ = urls;
                return Err(env_err(
                    "built without the `discovery-client` feature of socketioxide-mesh".into(),
                ));
            }
        }
        if let Some(v) = get("MESH_SEEDS") {
            let seeds: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            for s in &seeds {
                crate::seed::parse_host_port(s).map_err(|reason| ConfigError::Env {
                    var: "MESH_SEEDS",
                    value: v.clone(),
                    reason,
                })?;
            }
            if !seeds.is_empty() {
                cfg.seeds.push(Arc::new(StaticSeeds::new(seeds)));
            }
        }
        if let Some(v) = get("MESH_TLS_RELOAD_MS") {
            let ms: u64 = parse("MESH_TLS_RELOAD_MS", v)?;
            cfg.tls_reload = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(d) = ms("MESH_SEED_INTERVAL_MS")? {
            cfg.seed_interval = d;
        }
        if let Some(d) = ms("MESH_GOSSIP_INTERVAL_MS")? {
            cfg.gossip_interval = d;
        }
        if let Some(v) = get("MESH_PHI_THRESHOLD") {
            cfg.phi_threshold = parse("MESH_PHI_THRESHOLD", v)?;
        }
        if let Some(d) = ms("MESH_REQUEST_TIMEOUT_MS")? {
            cfg.request_timeout = d;
        }
        if let Some(v) = get("MESH_MAX_FRAME_SIZE") {
            cfg.max_frame_size = parse("MESH_MAX_FRAME_SIZE", v)?;
        }
        if let Some(v) = get("MESH_PEER_QUEUE_LEN") {
            cfg.peer_queue_len = parse("MESH_PEER_QUEUE_LEN", v)?;
        }
        if let Some(v) = get("MESH_PEER_QUEUE_BYTES") {
            cfg.peer_queue_bytes = parse("MESH_PEER_QUEUE_BYTES", v)?;
        }
        if let Some(d) = ms("MESH_SLOW_PEER_TIMEOUT_MS")? {
            cfg.slow_peer_timeout = d;
        }
        if let Some(v) = get("MESH_BATCH_DELAY_US") {
            cfg.batch_delay = Duration::from_micros(parse("MESH_BATCH_DELAY_US", v)?);
        }
        if let Some(v) = get("MESH_MAX_IN_FLIGHT") {
            cfg.max_in_flight_requests = parse("MESH_MAX_IN_FLIGHT", v)?;
        }
        if let Some(v) = get("MESH_ROUTING") {
            cfg.routing = parse("MESH_ROUTING", v)?;
        }
        if let Some(d) = ms("MESH_PROBE_INTERVAL_MS")? {
            cfg.probe_interval = d;
        }
        if let Some(d) = ms("MESH_PROBE_TIMEOUT_MS")? {
            cfg.probe_timeout = d;
        }
        if let Some(d) = ms("MESH_LINK_GRACE_MS")? {
            cfg.link_grace = d;
        }
        if let Some(d) = ms("MESH_INTEREST_INTERVAL_MS")? {
            cfg.interest_interval = d;
        }
        if let Some(v) = get("MESH_MAX_INTEREST_ROOMS") {
            cfg.max_interest_rooms = parse("MESH_MAX_INTEREST_ROOMS", v)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Nodes only talk to nodes of the same cluster id (checked in the handshake and in
    /// gossip). 1-64 characters from `[A-Za-z0-9._-]`. Default: `socketioxide-mesh`.
    pub fn with_cluster_id(mut self, id: impl Into<String>) -> Self {
        self.cluster_id = id.into();
        self
    }

    /// The peer transport. Default: [`TransportKind::Quic`].
    pub fn with_transport(mut self, kind: TransportKind) -> Self {
        self.transport = kind;
        self
    }

    /// The address the peer transport binds (UDP for QUIC, TCP for WebSocket). Port 0 picks
    /// a free port.
    /// Default: `0.0.0.0:7800`.
    pub fn with_listen_addr(mut self, addr: SocketAddr) -> Self {
        self.listen_addr = addr;
        self
    }

    /// The address other nodes dial to reach this one (the pod IP on Kubernetes). Default: the
    /// bound listen address, which must then be a specific IP.
    pub fn with_advertise_addr(mut self, addr: SocketAddr) -> Self {
        self.advertise_addr = Some(addr);
        self
    }

    /// Add a seed source. Sources are asked every [`with_seed_interval`](Self::with_seed_interval)
    /// for addresses of possible members; gossip does the rest. Default: none (a node without
    /// seeds waits for others to find it).
    pub fn with_seeds(mut self, source: impl SeedSource) -> Self {
        self.seeds.push(Arc::new(source));
        self
    }

    /// Add a shared seed source (see [`with_seeds`](Self::with_seeds)).
    pub fn with_seed_source(mut self, source: Arc<dyn SeedSource>) -> Self {
        self.seeds.push(source);
        self
    }

    /// How often seed sources are asked for addresses. Default: 5 s.
    pub fn with_seed_interval(mut self, interval: Duration) -> Self {
        self.seed_interval = interval;
        self
    }

    /// The gossip period: how often a node exchanges digests with three others (anti-entropy
    /// and its socket count). Joins, leaves, deaths and a node's own changes do not wait for
    /// it: they travel on connections and probes at once. Gossip's own failure detector
    /// (heartbeats, see [`with_phi_threshold`](Self::with_phi_threshold)) follows this period
    /// and is only the last resort for peers of a release without probes. Default: 5 s.
    pub fn with_gossip_interval(mut self, interval: Duration) -> Self {
        self.gossip_interval = interval;
        self
    }

    /// The phi-accrual failure detector threshold: higher is slower to declare death and less
    /// prone to false positives. Default: 8.
    pub fn with_phi_threshold(mut self, phi: f64) -> Self {
        self.phi_threshold = phi;
        self
    }

    /// How long a dead node's state is remembered before being forgotten. Default: 5 min.
    pub fn with_dead_node_grace_period(mut self, period: Duration) -> Self {
        self.dead_node_grace_period = period;
        self
    }

    /// The bound on every request to peers (fetch_sockets, rooms, acks on top of the ack
    /// timeout). A request normally ends much sooner: when every live peer has answered or died.
    /// Default: 5 s.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The largest frame accepted from or sent to a peer; a larger one closes the connection
    /// with a logged error. Default: 16 MiB.
    pub fn with_max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// The bound of each peer's outgoing command queue, in commands and in bytes. A command
    /// that finds the queue full cuts the peer off (it reconnects; the queue is dropped and
    /// counted in `commands_lost`). Volatile broadcasts are dropped earlier, once a quarter
    /// of the bytes is queued. The bound is a memory cap, not a pace: a burst on a busy
    /// machine should fit. Default: 262144 commands, 64 MiB (at least `max_frame_size`).
    pub fn with_peer_queue(mut self, len: usize, bytes: usize) -> Self {
        self.peer_queue_len = len;
        self.peer_queue_bytes = bytes;
        self
    }

    /// A peer that accepts no command for this long while commands wait for it is cut off
    /// (it reconnects): the write deadline of a stalled or frozen peer. It must exceed the
    /// time a healthy peer needs to take one batch (up to 1 MiB, or one larger command).
    /// Default: 10 s.
    pub fn with_slow_peer_timeout(mut self, timeout: Duration) -> Self {
        self.slow_peer_timeout = timeout;
        self
    }

    /// On a busy link, how long a command may wait to share one write (one system call, one
    /// packet train, one wake-up of the peer) with the commands that follow it. A link
    /// writes at most once per this delay while it is busy; a command that finds the link
    /// quiet for longer leaves at once. Measured at 10,000 publishes/s on 3 nodes (3,300
    /// commands/s per link): 0.38 send calls per command without delay, 0.15 at 1 ms, 0.10 at
    /// 2 ms, 0.08 at 3 ms, with CPU and tail latency within noise of each other on loopback;
    /// the price is up to the delay (plus the runtime timer's 1 ms resolution) of added
    /// latency per hop, ~1.5 ms of median at 3 ms. Zero writes as soon as the writer runs.
    /// Default: 3 ms; at most 100 ms.
    pub fn with_batch_delay(mut self, delay: Duration) -> Self {
        self.batch_delay = delay;
        self
    }

    /// Interest-based routing: a broadcast to rooms goes only to the nodes with members in one
    /// of its rooms (each node announces its rooms to its peers), instead of to every node.
    /// Broadcasts to all sockets, `except`-only and to a socket still go everywhere. Nodes of
    /// the previous release, and nodes with routing off, neither announce nor filter: they
    /// get every broadcast, as before.
    ///
    /// The price: a room's new member on node B is known to the other nodes only once B
    /// announced it, within [`with_interest_interval`](Self::with_interest_interval) plus one
    /// hop. A room broadcast from node A in that window can miss it, unless A made the join
    /// itself (`io.in(..).join(..)`, `remote_socket.join(..)` from A: exact). socketioxide
    /// applies `socket.join` without telling the adapter, so B can only notice it by looking.
    /// Without routing a broadcast reaches every socket that joined before it arrives. See
    /// the README's "Routing". Default: off.
    pub fn with_routing(mut self, on: bool) -> Self {
        self.routing = on;
        self
    }

    /// How often this node compares its rooms with what it last announced, and announces the
    /// changes. Shorter narrows the window after a local `socket.join` (see
    /// [`with_routing`](Self::with_routing)) at the cost of scanning the rooms more often. A
    /// scan goes over every membership of every local socket; a node with so many that a
    /// scan takes longer than 1 % of this interval scans less often (at most 1 % of a core).
    /// Default: 20 ms; 1 ms to 10 s.
    pub fn with_interest_interval(mut self, every: Duration) -> Self {
        self.interest_interval = every;
        self
    }

    /// Rooms announced per namespace at most; beyond, the node announces "every room" of that
    /// namespace (it gets all its room broadcasts, as without routing). Default: 10,000.
    pub fn with_max_interest_rooms(mut self, n: usize) -> Self {
        self.max_interest_rooms = n;
        self
    }

    /// How many request streams may be open at once on one peer connection, in each direction.
    /// Default: 1024.
    pub fn with_max_concurrent_streams(mut self, n: u32) -> Self {
        self.max_concurrent_streams = n;
        self
    }

    /// How many requests this node may have in flight at once; more wait for a slot (within
    /// the request timeout). Default: 4096.
    pub fn with_max_in_flight_requests(mut self, n: usize) -> Self {
        self.max_in_flight_requests = n;
        self
    }

    /// Transport keep-alive period and idle timeout: they keep idle connections open (and
    /// middleboxes' state warm), and the idle timeout is the last line of defence behind the
    /// probes ([`with_probe`](Self::with_probe)). Defaults: 10 s and 30 s.
    pub fn with_keep_alive(mut self, interval: Duration, idle_timeout: Duration) -> Self {
        self.keep_alive_interval = interval;
        self.idle_timeout = idle_timeout;
        self
    }

    /// Failure detection by probes: every `interval` this node pings one member (each in
    /// turn); a member that leaves a ping unanswered for `timeout` is suspected (the others are
    /// told) and pinged again; unanswered again, it is declared dead by every node that
    /// checked. A member that went silent is therefore dropped by all within about
    /// `interval` + 2 × `timeout`, at a cost that does not grow with the cluster (one ping
    /// and one answer per node per `interval`). Defaults: 200 ms and 600 ms.
    ///
    /// ```
    /// # use socketioxide_mesh::{DevCa, MeshConfig};
    /// # use std::time::Duration;
    /// # let tls = DevCa::generate("doc")?.node_tls("n0")?;
    /// // A more patient detector, for nodes that stall under heavy GC-like pauses.
    /// let cfg = MeshConfig::new(tls).with_probe(Duration::from_millis(500), Duration::from_secs(2));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_probe(mut self, interval: Duration, timeout: Duration) -> Self {
        self.probe_interval = interval;
        self.probe_timeout = timeout;
        self
    }

    /// How long a member whose connection closed (without a goodbye) stays listed while it is
    /// redialed; past it, the member is dropped until it is back, and commands queued for it
    /// are counted lost. A failed redial drops it at once. Default: 1 s.
    pub fn with_link_grace(mut self, grace: Duration) -> Self {
        self.link_grace = grace;
        self
    }

    /// The bound on establishing a connection (handshake included). Default: 3 s.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Reconnection backoff: doubles from `min` to `max`, with ±25% jitter.
    /// Defaults: 100 ms and 5 s.
    pub fn with_reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// When the TLS material was read from files, check them this often and use the new
    /// certificates for connections made from then on (cert-manager rotations, Kubernetes
    /// secret updates); `None` disables it. A file that fails to load is logged and the current
    /// material kept. Default: every 30 s.
    pub fn with_tls_reload(mut self, every: Option<Duration>) -> Self {
        self.tls_reload = every;
        self
    }

    /// The cluster id.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The transport kind.
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// Check every value. [`Mesh::start`](crate::Mesh::start) calls it too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let id_ok = crate::seed::discovery_api::valid_cluster_id(&self.cluster_id);
        if !id_ok {
            return Err(ConfigError::ClusterId(self.cluster_id.clone()));
        }
        if let Some(adv) = self.advertise_addr
            && (adv.ip().is_unspecified() || adv.port() == 0)
        {
            return Err(ConfigError::AdvertiseAddrInvalid(adv));
        }
        let range = |name: &'static str, v: Duration, min: Duration, max: Duration| {
            if v < min || v > max {
                Err(ConfigError::Value {
                    name,
                    reason: format!("{v:?} is outside {min:?}..={max:?}"),
                })
            } else {
                Ok(())
            }
        };
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        range("gossip_interval", self.gossip_interval, ms(10), s(60))?;
        range("seed_interval", self.seed_interval, ms(50), s(3600))?;
        range("request_timeout", self.request_timeout, ms(10), s(3600))?;
        range(
            "dead_node_grace_period",
            self.dead_node_grace_period,
            s(1),
            s(7 * 86400),
        )?;
        range(
            "keep_alive_interval",
            self.keep_alive_interval,
            ms(10),
            s(60),
        )?;
        range("idle_timeout", self.idle_timeout, ms(100), s(600))?;
        range("probe_interval", self.probe_interval, ms(10), s(60))?;
        range("probe_timeout", self.probe_timeout, ms(10), s(3600))?;
        range("link_grace", self.link_grace, Duration::ZERO, s(600))?;
        range(
            "slow_peer_timeout",
            self.slow_peer_timeout,
            ms(100),
            s(3600),
        )?;
        range("batch_delay", self.batch_delay, Duration::ZERO, ms(100))?;
        range("interest_interval", self.interest_interval, ms(1), s(10))?;
        range("connect_timeout", self.connect_timeout, ms(10), s(600))?;
        range("reconnect_min", self.reconnect_min, ms(1), s(60))?;
        range(
            "reconnect_max",
            self.reconnect_max,
            self.reconnect_min,
            s(600),
        )?;
        if let Some(every) = self.tls_reload {
            range("tls_reload", every, ms(100), s(86400))?;
        }
        if self.keep_alive_interval >= self.idle_timeout {
            return Err(ConfigError::Value {
                name: "keep_alive_interval",
                reason: "must be shorter than the idle timeout".into(),
            });
        }
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
            return Err(ConfigError::Value {
                name: "phi_threshold",
                reason: format!("{} is not a positive number", self.phi_threshold),
            });
        }
        let count = |name: &'static str, v: usize, min: usize, max: usize| {
            if v < min || v > max {
                Err(ConfigError::Value {
                    name,
                    reason: format!("{v} is outside {min}..={max}"),
                })
            } else {
                Ok(())
            }
        };
        count("max_frame_size", self.max_frame_size, 64 * 1024, 1 << 30)?;
        count("peer_queue_len", self.peer_queue_len, 1, 1 << 24)?;
        count("max_interest_rooms", self.max_interest_rooms, 0, 1 << 20)?;
        count(
            "peer_queue_bytes",
            self.peer_queue_bytes,
            self.max_frame_size,
            1 << 34,
        )?;
        count(
            "max_in_flight_requests",
            self.max_in_flight_requests,
            1,
            1 << 20,
        )?;
        count(
            "max_concurrent_streams",
            self.max_concurrent_streams as usize,
            8,
            1 << 16,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::DevCa;
    use std::collections::HashMap;

    fn tls() -> TlsConfig {
        DevCa::generate("t").unwrap().node_tls("n").unwrap()
    }

    #[test]
    fn defaults_are_valid_and_a_bad_advertised_address_is_not() {
        // Listening everywhere without an advertised address: the mesh picks the outward
        // interface's at start.
        MeshConfig::new(tls()).validate().unwrap();
        MeshConfig::new(tls())
            .with_advertise_addr("10.0.0.1:7800".parse().unwrap())
            .validate()
            .unwrap();
        MeshConfig::local(tls()).validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused_with_their_name() {
        let cases = [
            (MeshConfig::local(tls()).with_cluster_id(""), "cluster id"),
            (
                MeshConfig::local(tls()).with_cluster_id("a b"),
                "cluster id",
            ),
            (
                MeshConfig::local(tls()).with_gossip_interval(Duration::ZERO),
                "gossip_interval",
            ),
            (
                MeshConfig::local(tls()).with_max_frame_size(10),
                "max_frame_size",
            ),
            (
                MeshConfig::local(tls()).with_peer_queue(0, 1 << 26),
                "peer_queue_len",
            ),
            (
                MeshConfig::local(tls()).with_phi_threshold(f64::NAN),
                "phi_threshold",
            ),
            (
                MeshConfig::local(tls()).with_batch_delay(Duration::from_secs(1)),
                "batch_delay",
            ),
            (
                MeshConfig::local(tls()).with_slow_peer_timeout(Duration::ZERO),
                "slow_peer_timeout",
            ),
            (
                MeshConfig::local(tls())
                    .with_keep_alive(Duration::from_secs(5), Duration::from_secs(1)),
                "keep_alive_interval",
            ),
            (
                MeshConfig::local(tls()).with_advertise_addr("0.0.0.0:1".parse().unwrap()),
                "cannot be dialed",
            ),
        ];
        for (cfg, needle) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn from_env_reads_every_variable() {
        let dir = std::env::temp_dir().join(format!("sio-mesh-cfg-{}", std::process::id()));
        DevCa::generate("t").unwrap().write_dir(&dir, "n").unwrap();
        let vars: HashMap<&str, String> = HashMap::from([
            ("MESH_TLS_DIR", dir.display().to_string()),
            ("MESH_CLUSTER_ID", "prod-chat".into()),
            ("MESH_LISTEN_ADDR", "0.0.0.0:9000".into()),
            ("POD_IP", "10.1.2.3".into()),
            (
                "MESH_SEEDS",
                "mesh-headless.default.svc:9000, 10.1.2.4:9000".into(),
            ),
            ("MESH_GOSSIP_INTERVAL_MS", "200".into()),
            ("MESH_REQUEST_TIMEOUT_MS", "1500".into()),
            ("MESH_PEER_QUEUE_LEN", "100".into()),
            ("MESH_SLOW_PEER_TIMEOUT_MS", "2500".into()),
            ("MESH_BATCH_DELAY_US", "500".into()),
            ("MESH_ROUTING", "false".into()),
            ("MESH_INTEREST_INTERVAL_MS", "50".into()),
            ("MESH_MAX_INTEREST_ROOMS", "10".into()),
        ]);
        let cfg = MeshConfig::from_lookup(|k| vars.get(k).cloned()).unwrap();
        assert_eq!(cfg.cluster_id, "prod-chat");
        assert_eq!(cfg.advertise_addr, Some("10.1.2.3:9000".parse().unwrap()));
        assert_eq!(cfg.gossip_interval, Duration::from_millis(200));
        assert_eq!(cfg.request_timeout, Duration::from_millis(1500));
        assert_eq!(cfg.peer_queue_len, 100);
        assert_eq!(cfg.slow_peer_timeout, Duration::from_millis(2500));
        assert_eq!(cfg.batch_delay, Duration::from_micros(500));
        assert!(!cfg.routing);
        assert_eq!(cfg.interest_interval, Duration::from_millis(50));
        assert_eq!(cfg.max_interest_rooms, 10);
        assert_eq!(cfg.seeds.len(), 1);

        let mut bad = vars.clone();
        bad.insert("MESH_GOSSIP_INTERVAL_MS", "fast".into());
        let err = MeshConfig::from_lookup(|k| bad.get(k).cloned()).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Env {
                    var: "MESH_GOSSIP_INTERVAL_MS",
                    ..
                }
            ),
            "{err}"
        );

        let mut bad = vars.clone();
        bad.insert("MESH_SEEDS", "no-port-here".into());
        let err = MeshConfig::from_lookup(|k| bad.get(k).cloned()).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Env {
                    var: "MESH_SEEDS",
                    ..
                }
            ),
            "{err}"
        );

        let err = MeshConfig::from_lookup(|_| None).unwrap_err();
        assert!(err.to_string().contains("MESH_TLS_DIR"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
