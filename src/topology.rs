//! A JSON-ready picture of the mesh as one node sees it ([`Mesh::topology`](crate::Mesh::topology)):
//! this node (its namespaces, rooms and sockets), every live member (what it serves, its
//! sockets) and the link to it (state, round-trip time, queue), and the node's counters. The
//! example app draws it live on `/topology`.

use serde::Serialize;

use crate::MeshStats;

/// See the [module docs](self).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Topology {
    /// This node's id.
    pub node_id: String,
    /// The address peers dial.
    pub addr: String,
    /// `quic` or `ws`.
    pub transport: &'static str,
    /// [`Mesh::ready`](crate::Mesh::ready).
    pub ready: bool,
    /// The namespaces this node serves, with their local sockets and rooms.
    pub namespaces: Vec<NamespaceView>,
    /// The live members and the links to them.
    pub peers: Vec<PeerView>,
    /// This node's counters (drops, refusals...).
    pub stats: MeshStats,
}

/// A namespace served by this node.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct NamespaceView {
    /// The namespace path.
    pub name: String,
    /// Sockets connected to this node in it.
    pub sockets: usize,
    /// Its rooms on this node (at most [`MAX_ROOMS`], the fullest first).
    pub rooms: Vec<RoomView>,
}

/// Rooms listed per namespace, at most.
pub const MAX_ROOMS: usize = 50;

/// A room on this node.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct RoomView {
    /// The room.
    pub name: String,
    /// This node's sockets in it.
    pub sockets: usize,
}

/// A live member and the link to it.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PeerView {
    /// Its id.
    pub node_id: String,
    /// Its mesh address.
    pub addr: String,
    /// The namespaces it serves.
    pub namespaces: Vec<String>,
    /// Its sockets (from gossip, refreshed every few seconds).
    pub sockets: u64,
    /// `connected` or `connecting`.
    pub link: &'static str,
    /// The transport's round-trip time estimate (QUIC only), in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Commands waiting in its queue.
    pub queued_commands: usize,
    /// Bytes waiting in its queue.
    pub queued_bytes: usize,
    /// It announces its rooms (interest-based routing), and this node routes by them.
    pub routing: bool,
    /// The rooms it announced, per namespace this node serves: a room broadcast goes to it
    /// only if it has one of the broadcast's rooms. `None` until its first announcement on
    /// the current connection (it gets every broadcast meanwhile), and for a member without
    /// routing.
    pub interest: Option<Vec<PeerRooms>>,
}

/// The rooms of a namespace a member announced.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PeerRooms {
    /// The namespace path.
    pub namespace: String,
    /// It announced every room (more than `max_interest_rooms`): it gets every broadcast.
    pub every_room: bool,
    /// The rooms (at most [`MAX_ROOMS`], by name).
    pub rooms: Vec<String>,
}
