#![warn(missing_docs)]
//! # socketioxide-mesh
//!
//! Scale [socketioxide](https://docs.rs/socketioxide) servers horizontally **without a
//! broker**: the servers talk to each other directly, over mutually-authenticated QUIC
//! (default) or WebSocket over TLS (`TransportKind::Ws`, for networks that carry only TCP),
//! and find each other by gossip.
//!
//! ```no_run
//! use socketioxide::{SocketIo, extract::{Data, SocketRef}, handler::ConnectHandler};
//! use socketioxide_mesh::{Mesh, MeshAdapter, MeshConfig, StaticSeeds, TlsConfig, TransportKind};
//!
//! type A = MeshAdapter<socketioxide::adapter::Emitter>;
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = MeshConfig::new(TlsConfig::from_dir("/etc/mesh-tls")?)
//!     .with_transport(TransportKind::Quic) // or TransportKind::Ws
//!     .with_seeds(StaticSeeds::new(["mesh.default.svc.cluster.local:7800"]));
//! let mesh = Mesh::start(config).await?;
//! let (layer, io) = SocketIo::builder()
//!     .max_buffer_size(4096) // peers' broadcasts arrive in bursts
//!     .with_adapter::<A>(mesh.clone())
//!     .build_layer();
//! // Register handlers in a connect middleware: socketioxide 0.18 answers the client's connect
//! // before an async connect handler runs, and events sent right after would find no handler.
//! let register = |s: SocketRef<A>| async move {
//!     s.join("lobby");
//!     s.on("say", async |s: SocketRef<A>, Data(msg): Data<String>| {
//!         // reaches the lobby's sockets on every node
//!         let _ = s.to("lobby").emit("said", &msg).await;
//!     });
//!     Ok::<(), std::convert::Infallible>(())
//! };
//! io.ns("/", (async || {}).with(register)).await?;
//! # let _ = layer;
//! # Ok(()) }
//! ```
//!
//! Features (both on by default): `dev-ca` ([`DevCa`], an in-memory development CA, rcgen)
//! and `discovery-client` ([`DiscoverySeeds`], the discovery service's client, hyper). A
//! production build that loads PEM files and uses static or DNS seeds can turn them off:
//! `default-features = false`.
//!
//! # Layout
//!
//! Imports run downward only, layer by layer (checked in CI by `.ci/check-layers.py`):
//!
//! ```text
//! SocketIo ──► MeshAdapter<E> (one per namespace)              adapter.rs
//!                   │ commands / requests
//!                   ▼
//!              Mesh (one per process)                          mesh/, telemetry.rs, topology.rs
//!   handle, shared state, counters, server events, the driver task, peer connections,
//!   per-peer batching links, requests (I/O), routing snapshot
//!                   │
//!   config.rs      MeshConfig, from code or the environment
//!                   │
//!   membership.rs  gossip + failure detector (chitchat, confined here), on the peer links
//!   seed/          where the first peers come from (pluggable SeedSource; discovery API)
//!   transport/     authenticated frames on multiplexed streams: quic, ws, mem (tests);
//!                  batched writes, zero-copy frame decoding, system calls counted
//!                   │
//!   peers.rs       sans-IO peer table: who to dial, which connection, dead members
//!   answers.rs     sans-IO answer tracking: who a request still waits for
//!                   │
//!   wire.rs        the peer protocol (MessagePack, versioned, append-only tags, close codes)
//!   tls.rs         mutual TLS material, the node identity check, dev CA (tls/dev.rs)
//!   incidents.rs   refusals and losses: exact counts, rate-limited logs
//!   error.rs, backoff.rs
//! ```
//!
//! # How a broadcast travels
//!
//! `io.to("room").emit(..)` on node A encodes the packet once, queues it for every live peer
//! (a bounded queue per peer, found through a routing snapshot: no lock, no allocation), then
//! emits to A's own sockets. One task per peer takes everything queued and writes it in one
//! go on that peer's ordered command stream (on a busy link, at most once per `batch_delay`);
//! the peer cuts the frames out of what arrived without copying them and applies them in the
//! order A issued them, so `join` followed by an emit to the room behaves on remote nodes as
//! it does locally.
//!
//! # How a request travels
//!
//! `fetch_sockets`, `rooms` and broadcasts with acks open one stream per live peer (a peer
//! not serving the namespace answers empty), many in flight at once. A request ends when every peer answered
//! **or died**: when gossip declares a peer dead (about a second on a LAN) its connection is
//! closed and its streams fail at once, so a dead peer never costs the full timeout. A
//! request also sees the effect of every command its node sent before it.
//!
//! # Security
//!
//! Every connection is mutual TLS 1.3: nodes present a certificate signed by the cluster CA
//! and verify their peers'. Then a handshake checks the protocol magic and version and the
//! cluster id. Gossip rides the same connections: the node opens one port, and nothing
//! arrives on it unauthenticated.

// The crate's own tests generate certificates.
#[cfg(all(test, not(feature = "dev-ca")))]
compile_error!("socketioxide-mesh's tests need the `dev-ca` feature (on by default)");

pub mod adapter;
mod answers;
mod backoff;
mod config;
mod error;
mod incidents;
mod interest;
mod membership;
mod mesh;
mod peers;
mod probe;
pub mod seed;
mod telemetry;
pub mod tls;
pub mod topology;
mod transport;
mod wire;

#[cfg(test)]
mod fuzz;

pub use adapter::MeshAdapter;
#[doc(no_inline)]
pub use async_trait::async_trait;
pub use config::{DEFAULT_PORT, MeshConfig, TransportKind};
pub use error::{ConfigError, Error, PeerError, TlsError};
pub use incidents::IncidentCounts;
pub use membership::Member;
pub use mesh::{Mesh, MeshStats, ServerEvent};
#[cfg(feature = "discovery-client")]
pub use seed::DiscoverySeeds;
pub use seed::StaticSeeds;
pub use tls::TlsConfig;
#[cfg(feature = "dev-ca")]
pub use tls::{DevCa, NodeCert};
pub use topology::Topology;
pub use wire::PROTOCOL_VERSION;

/// The README's code, compiled as a doctest so it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
