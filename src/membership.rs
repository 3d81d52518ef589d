//! Membership: chitchat (scuttlebutt gossip + phi-accrual failure detector) carried over the
//! authenticated peer connections through a custom chitchat [`Transport`] — there is no
//! plaintext gossip port.
//!
//! chitchat is pinned to `=0.11.0`: later versions no longer let a crate outside chitchat
//! implement its `Transport` (the message encoding became private, quickwit-oss/chitchat#207).

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use bytes::Bytes;
use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage, Deserializable,
    FailureDetectorConfig, ListenerHandle, NodeState, Serializable,
    transport::{Socket, Transport},
};
use socketioxide_core::Uid;
use tokio::sync::{Mutex as AsyncMutex, Notify, mpsc, watch};

use crate::{Error, wire::PROTOCOL_VERSION};

/// Gossip state keys.
pub(crate) mod keys {
    pub const VERSION: &str = "v";
    pub const TRANSPORT: &str = "transport";
    pub const SERVER_ID: &str = "sio";
    pub const NAMESPACE_PREFIX: &str = "ns:";
    pub const SOCKETS: &str = "sockets";
    pub const LEAVING: &str = "leaving";
    /// Present (`1`) on nodes that announce their rooms and understand announcements
    /// (interest-based routing): the previous release has no such key.
    pub const INTEREST: &str = "interest";
    /// Present (`1`) on nodes that answer liveness probes (see `crate::probe`).
    pub const PROBE: &str = "probe";
}

/// A node gossip never saw alive this long after its state arrived counts as dead.
const NEVER_LIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// Gossip messages waiting to be sent, bounded: like UDP, gossip is dropped under pressure.
const GOSSIP_QUEUE: usize = 1024;

/// Another node of the mesh, as gossip describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Member {
    /// The node's mesh id.
    pub node_id: Uid,
    /// The address its peer transport listens on.
    pub addr: SocketAddr,
    /// The socketioxide server id of the `SocketIo` it serves, once it serves one.
    pub server_id: Option<Uid>,
    /// The namespaces it serves.
    pub namespaces: Vec<String>,
    /// Its number of connected sockets, refreshed every few seconds (for observability).
    pub sockets: u64,
    /// It announces its rooms and understands announcements (interest-based routing).
    pub(crate) interest: bool,
    /// It answers liveness probes.
    pub(crate) probe: bool,
    /// Gossip's failure detector declared it dead (its heartbeats stopped). The mesh believes
    /// a connection that answers its probes over this.
    pub(crate) gossip_dead: bool,
}

impl Member {
    /// Whether the member serves namespace `ns`.
    pub fn serves(&self, ns: &str) -> bool {
        self.namespaces.iter().any(|n| n == ns)
    }
}

/// The chitchat side of a node.
pub(crate) struct Membership {
    handle: ChitchatHandle,
    chitchat: Arc<AsyncMutex<Chitchat>>,
    self_id: ChitchatId,
    transport: &'static str,
    /// Woken when this node changes what it publishes (not its socket count): the mesh then
    /// pushes the change to its peers instead of waiting for gossip rounds.
    local_change: Arc<Notify>,
}

/// The channels between chitchat and the peer connections.
/// What membership needs from the configuration (built by the mesh: imports run downward).
#[derive(Debug, Clone)]
pub(crate) struct MembershipSettings {
    pub cluster_id: String,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    pub dead_node_grace_period: Duration,
    /// `quic` or `ws`: members of the other kind are not ours.
    pub transport: &'static str,
    /// This node announces its rooms (interest-based routing).
    pub interest: bool,
}

/// A gossip message received from a peer, decoded (chitchat's type stays in this module).
pub(crate) struct GossipMessage(ChitchatMessage);

impl GossipMessage {
    /// Decode a gossip frame; the error says why it is not one.
    pub(crate) fn decode(frame: &[u8]) -> Result<Self, String> {
        let mut buf = frame;
        ChitchatMessage::deserialize(&mut buf)
            .map(GossipMessage)
            .map_err(|e| e.to_string())
    }
}

/// The live members, as gossip sees them (chitchat's types stay in this module).
///
/// chitchat re-evaluates liveness once per gossip round; with rounds seconds apart that would
/// hold a new node back that long. This watch also wakes on every state change gossip
/// brings, and reads the states directly: a node is a member from the moment its state
/// arrives until chitchat's failure detector declares it dead (the mesh's own probes and
/// connections usually notice first, see `crate::probe`).
pub(crate) struct LiveWatch {
    rx: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    /// Nodes chitchat listed live at least once, and when each other node was first seen:
    /// chitchat counts a node it has no heartbeat sample of yet as dead, which a new node is
    /// not (unless it stays so for [`NEVER_LIVE`]).
    ever_live: HashSet<ChitchatId>,
    first_seen: std::collections::HashMap<ChitchatId, std::time::Instant>,
    chitchat: Arc<AsyncMutex<Chitchat>>,
    changed: Arc<Notify>,
    _listener: ListenerHandle,
    self_id: ChitchatId,
    transport: &'static str,
}

/// One reading of [`LiveWatch`].
pub(crate) struct LiveView {
    /// The members this node can talk to (same protocol version and transport), not itself.
    pub members: Vec<Member>,
    /// Every node gossip lists as live, whatever it speaks.
    pub listed: Vec<Uid>,
}

impl LiveWatch {
    /// Wait for a change; `Err` once membership stopped.
    pub(crate) async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        tokio::select! {
            r = self.rx.changed() => r,
            _ = self.changed.notified() => Ok(()),
        }
    }

    /// The members now.
    pub(crate) async fn view(&mut self) -> LiveView {
        self.rx.borrow_and_update();
        let chitchat = self.chitchat.lock().await;
        let now = std::time::Instant::now();
        let states = chitchat.node_states();
        self.ever_live.extend(chitchat.live_nodes().cloned());
        self.ever_live.retain(|id| states.contains_key(id));
        self.first_seen.retain(|id, _| states.contains_key(id));
        for id in states.keys() {
            self.first_seen.entry(id.clone()).or_insert(now);
        }
        let dead: HashSet<ChitchatId> = chitchat
            .dead_nodes()
            .filter(|id| {
                self.ever_live.contains(*id)
                    || self
                        .first_seen
                        .get(*id)
                        .is_some_and(|t| now.duration_since(*t) >= NEVER_LIVE)
            })
            .cloned()
            .collect();
        let staying = states
            .iter()
            .filter(|(_, state)| state.get(keys::LEAVING).is_none());
        LiveView {
            members: parse_members(staying, &dead, &self.self_id, self.transport),
            listed: states
                .keys()
                .filter_map(|id| Uid::from_str(&id.node_id).ok())
                .collect(),
        }
    }
}

pub(crate) struct GossipPipes {
    /// Messages chitchat wants sent: (advertised address, encoded message).
    pub out_rx: mpsc::Receiver<(SocketAddr, Bytes)>,
    /// Messages received from peers: (their advertised address, message).
    pub in_tx: mpsc::Sender<(SocketAddr, GossipMessage)>,
}

struct GossipTransport {
    socket: Mutex<Option<GossipSocket>>,
}

struct GossipSocket {
    out_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    in_rx: mpsc::Receiver<(SocketAddr, GossipMessage)>,
}

#[async_trait]
impl Transport for GossipTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = self
            .socket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| anyhow::anyhow!("gossip socket already opened"))?;
        Ok(Box::new(socket))
    }
}

#[async_trait]
impl Socket for GossipSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let mut buf = Vec::with_capacity(msg.serialized_len());
        msg.serialize(&mut buf);
        if self.out_tx.try_send((to, Bytes::from(buf))).is_err() {
            tracing::debug!(%to, "gossip queue full, message dropped");
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        self.in_rx
            .recv()
            .await
            .map(|(addr, msg)| (addr, msg.0))
            .ok_or_else(|| anyhow::anyhow!("gossip inbox closed"))
    }
}

impl Membership {
    pub(crate) async fn start(
        cfg: &MembershipSettings,
        node_id: Uid,
        advertise_addr: SocketAddr,
    ) -> Result<(Self, GossipPipes), Error> {
        let (out_tx, out_rx) = mpsc::channel(GOSSIP_QUEUE);
        let (in_tx, in_rx) = mpsc::channel(GOSSIP_QUEUE);
        let transport = GossipTransport {
            socket: Mutex::new(Some(GossipSocket { out_tx, in_rx })),
        };
        // The generation distinguishes restarts of a node id; ids are fresh per process, so
        // the start time is enough.
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let self_id = ChitchatId::new(node_id.to_string(), generation, advertise_addr);
        let config = ChitchatConfig {
            chitchat_id: self_id.clone(),
            cluster_id: cfg.cluster_id.clone(),
            gossip_interval: cfg.gossip_interval,
            listen_addr: advertise_addr,
            // Seeds are dialed by the mesh (seed sources), then gossiped to explicitly.
            seed_nodes: Vec::new(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: cfg.phi_threshold,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(10).max(cfg.gossip_interval * 10),
                // Without this, a young cluster takes ~3x longer to notice a death.
                initial_interval: cfg.gossip_interval,
                dead_node_grace_period: cfg.dead_node_grace_period,
            },
            marked_for_deletion_grace_period: cfg.dead_node_grace_period,
            catchup_callback: None,
            extra_liveness_predicate: Some(Box::new(|state: &NodeState| {
                state.get(keys::LEAVING).is_none()
            })),
        };
        let mut initial = vec![
            (keys::VERSION.to_string(), PROTOCOL_VERSION.to_string()),
            (keys::TRANSPORT.to_string(), cfg.transport.to_string()),
            (keys::PROBE.to_string(), "1".to_string()),
        ];
        if cfg.interest {
            initial.push((keys::INTEREST.to_string(), "1".to_string()));
        }
        let handle = chitchat::spawn_chitchat(config, initial, &transport)
            .await
            .map_err(|e| Error::Membership(e.to_string()))?;
        let chitchat = handle.chitchat();
        Ok((
            Self {
                handle,
                chitchat,
                self_id,
                transport: cfg.transport,
                local_change: Arc::new(Notify::new()),
            },
            GossipPipes { out_rx, in_tx },
        ))
    }

    pub(crate) async fn live_watcher(&self) -> LiveWatch {
        let changed = Arc::new(Notify::new());
        let chitchat = self.chitchat.lock().await;
        let notify = changed.clone();
        // Every key another node changes (a new node's keys arrive the same way).
        let listener = chitchat.subscribe_event("", move |_| notify.notify_one());
        LiveWatch {
            rx: chitchat.live_nodes_watcher(),
            ever_live: HashSet::new(),
            first_seen: std::collections::HashMap::new(),
            chitchat: self.chitchat.clone(),
            changed,
            _listener: listener,
            self_id: self.self_id.clone(),
            transport: self.transport,
        }
    }

    /// Woken when this node changes what it publishes (see [`Membership::set`]).
    pub(crate) fn local_change(&self) -> Arc<Notify> {
        self.local_change.clone()
    }

    /// Publish `key`. Anything but the socket count wakes [`Membership::local_change`].
    pub(crate) async fn set(&self, key: &str, value: &str) {
        let mut chitchat = self.chitchat.lock().await;
        if chitchat.self_node_state().get(key) == Some(value) {
            return;
        }
        chitchat.self_node_state().set(key, value);
        if key != keys::SOCKETS {
            self.local_change.notify_one();
        }
    }

    pub(crate) async fn delete(&self, key: &str) {
        let mut chitchat = self.chitchat.lock().await;
        if chitchat.self_node_state().get(key).is_some() {
            chitchat.self_node_state().delete(key);
            self.local_change.notify_one();
        }
    }

    /// Send a gossip round to `addr` now (a new connection, a seed).
    pub(crate) fn gossip_to(&self, addr: SocketAddr) {
        if let Err(e) = self.handle.gossip(addr) {
            tracing::debug!(%addr, error = %e, "gossip server stopped");
        }
    }

    /// Stop the gossip server and wait for it.
    pub(crate) async fn shutdown(&self) {
        if self.handle.initiate_shutdown().is_ok()
            && let Err(e) = self.handle.termination_watcher().await
        {
            tracing::debug!(error = %e, "gossip server ended with an error");
        }
    }
}

/// Parse the live map into members, skipping ourselves and nodes we cannot talk to.
fn parse_members<'a>(
    live: impl Iterator<Item = (&'a ChitchatId, &'a NodeState)>,
    dead: &HashSet<ChitchatId>,
    self_id: &ChitchatId,
    transport: &str,
) -> Vec<Member> {
    let mut out = Vec::new();
    for (id, state) in live {
        if id.node_id == self_id.node_id {
            continue;
        }
        let Ok(node_id) = Uid::from_str(&id.node_id) else {
            tracing::warn!(node = %id.node_id, "gossip lists a node with a malformed id, ignored");
            continue;
        };
        let version = state.get(keys::VERSION);
        if version != Some(PROTOCOL_VERSION.to_string().as_str()) {
            tracing::debug!(node = %node_id, ?version, "member speaks another protocol version, ignored");
            continue;
        }
        if state.get(keys::TRANSPORT) != Some(transport) {
            continue;
        }
        let server_id = state
            .get(keys::SERVER_ID)
            .and_then(|s| Uid::from_str(s).ok());
        let namespaces = state
            .iter_prefix(keys::NAMESPACE_PREFIX)
            .map(|(k, _)| k[keys::NAMESPACE_PREFIX.len()..].to_string())
            .collect();
        let sockets = state
            .get(keys::SOCKETS)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        out.push(Member {
            node_id,
            addr: id.gossip_advertise_addr,
            server_id,
            namespaces,
            sockets,
            interest: state.get(keys::INTEREST) == Some("1"),
            probe: state.get(keys::PROBE) == Some("1"),
            gossip_dead: dead.contains(id),
        });
    }
    out
}
